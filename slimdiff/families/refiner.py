"""The SDXL refiner: ``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score`` and its
``UNet2DConditionModel``.

The refiner is SDXL's second expert: it re-runs the last, low-noise part of the schedule over an image (the base
model's latents, or any picture), conditioned on the second text tower only. Its UNet's call is SDXL's with two
differences the adapter owns: ``encoder_hidden_states`` is that one tower's penultimate hidden state (1280 wide in
SDXL-refiner 1.0), and ``time_ids`` holds five numbers — original size, crop top-left and an *aesthetic score*
(6.0 for the prompt, 2.5 for the negative prompt by default) — instead of the base's six.

Calibration runs the refiner as it is used: each prompt's image (``CalibrationConfig.images``, e.g. COCO
photographs, one per prompt in turn, resized to the calibration size) is noised to ``strength`` of the schedule
(the pipeline's 0.3 by default) and denoised from there, so the statistics come from the timesteps the refiner
visits. Or it runs the refiner on what it refines in diffusers' *ensemble of expert denoisers*
(``CalibrationConfig.base``, ``--base``): the SDXL base samples the schedule to ``denoising_end=refiner_start`` and
the refiner denoises the base's latents from ``denoising_start=refiner_start`` on, so the statistics come from the
timesteps and inputs the refiner sees when it is served after the base (:func:`ensemble_loop`). The benchmark's
end-to-end runs refine one fixed synthetic image instead, and so does ``slimdiff eval`` unless it is given images
(``--images``) or a base (``--base``: the refiner compared as served after it).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

from ..errors import SlimDiffError
from . import family_for
from .base import (
    FAMILIES,
    MODEL_DTYPE,
    PENULTIMATE_HIDDEN_STATE,
    TEXT_EMBEDS,
    ConditionInput,
    ServedTextEncoder,
    TextTower,
    image_generators,
    pipeline_call_default,
)
from .images import calibration_images, colour_ramp, images_of_seeds
from .sd import _unet_of, guidance
from .sdxl import (
    REFINER_TIME_IDS,
    StableDiffusionXLFamily,
    guidance_embedding,
    is_refiner_unet,
    pooled_width,
    time_ids_of,
)

#: Where the base hands its latents to the refiner when nothing says otherwise: the fraction of the schedule the
#: base runs (diffusers' ensemble example's ``high_noise_frac``; its ``denoising_end`` and ``denoising_start``).
REFINER_START = 0.8


class _VacuousUpcastWarning(logging.Filter):
    """Drops diffusers' warning that a model cast with ``.to(dtype)`` has modules to keep in float32 when it lists
    none: SDXL's image-to-image pipeline upcasts its VAE (``force_upcast``) that way in every call, and the warning,
    empty for an ``AutoencoderKL``, would bury calibration's and evaluation's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []." not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_VacuousUpcastWarning())


def refining_steps(steps: int, strength: float) -> int:
    """The denoising steps an image-to-image call of ``steps`` at ``strength`` runs (diffusers' ``get_timesteps``)."""
    return min(int(steps * strength), steps)


def refiner_loop(pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: the refiner pipeline's own sampling of one batch — prompt ``i`` refines
    ``images[seed mod count]`` at the calibration size, its noise drawn by the prompt's generator — to latents."""
    files = calibration_images(config.images, "the SDXL refiner is calibrated on the images it refines",
                               otherwise=", or the SDXL base whose latents it refines (`--base MODEL`)")
    strength = pipeline_call_default(pipe, "strength") if config.strength is None else config.strength
    if refining_steps(config.steps, strength) < 1:
        raise SlimDiffError(f"{config.steps} steps at strength {strength} run no denoising step (the refiner runs "
                            f"int(steps × strength) of them): raise --steps or --strength")
    unet, scale = pipe.unet, pipe.vae_scale_factor
    height = config.height or unet.config.sample_size * scale
    width = config.width or unet.config.sample_size * scale

    def run(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        from PIL import Image

        # the pipeline draws each image's latent sample and its noise by the image's generator
        generators = image_generators(seeds)
        images = [image.resize((width, height), Image.Resampling.BICUBIC) for image in images_of_seeds(files, seeds)]
        pipe(list(prompts), image=images, strength=strength, num_inference_steps=config.steps, **guidance(config),
             generator=generators, output_type="latent")

    return run


def ensemble_shares(scheduler: Any, steps: int, start: float) -> tuple[int, int]:
    """``(base steps, refiner steps)`` of diffusers' ensemble of expert denoisers on ``scheduler``'s ``steps``-step
    schedule handing over at ``start``: the base (``denoising_end=start``) runs the timesteps at or above the cut-off
    round((1 − start)·T), T the training timesteps, and the refiner (``denoising_start=start``) those below it (one
    more on a second-order scheduler when they are even) — as the pipelines count them."""
    schedule = type(scheduler).from_config(scheduler.config)
    schedule.set_timesteps(steps)
    train = schedule.config.num_train_timesteps
    cutoff = int(round(train - start * train))
    timesteps = schedule.timesteps
    refiner = int((timesteps < cutoff).sum())
    if schedule.order == 2 and refiner % 2 == 0:
        refiner += 1
    return int((timesteps >= cutoff).sum()), refiner


def _handover(steps: int, start: float) -> str:
    return f"{steps} steps handing over at {start} (the cut-off timestep round((1 − {start}) × T))"


def check_refiner_share(refiner: Any, config: Any) -> None:
    """One line when the ensemble at ``config``'s steps and ``refiner_start`` leaves the refiner no step."""
    if ensemble_shares(refiner.scheduler, config.steps, config.refiner_start)[1] < 1:
        raise SlimDiffError(f"{_handover(config.steps, config.refiner_start)} leave the refiner no step (it runs the "
                            "timesteps below the cut-off): raise --steps or lower --refiner-start")


def check_base(base: Any, refiner: Any, config: Any, source: str | None = None) -> None:
    """One line, before any sampling, when ``base`` is no SDXL base pipeline (a refiner, SD-1.x, PixArt, an inpainting
    model…), when its latents do not fit the refiner (its VAE's latent channels against the refiner UNet's input, the
    VAEs' scale: diffusers hands the base's latents to the refiner as they are), or when the ensemble at ``config``'s
    steps and ``refiner_start`` leaves either model no step."""
    name = "the base model" if source is None else f"--base {source!r}"
    refines = family_for(refiner).name
    family = family_for(base)
    if family.serving_refiner_family != refines or type(base).__name__ != family.serving_pipeline:
        raise SlimDiffError(f"{name} is a {type(base).__name__} ({family.name!r} family), not an SDXL base: the "
                            "refiner refines the latents of a StableDiffusionXLPipeline")
    channels, takes = base.vae.config.latent_channels, refiner.unet.config.in_channels
    if channels != takes:
        raise SlimDiffError(f"{name} draws {channels}-channel latents (its VAE's), the refiner's UNet takes {takes}: "
                            "they are not an SDXL base and its refiner")
    scales = [(p.vae_scale_factor, p.vae.config.scaling_factor) for p in (base, refiner)]
    if scales[0] != scales[1]:
        (down, factor), (r_down, r_factor) = scales
        raise SlimDiffError(f"{name}'s VAE scales latents unlike the refiner's (1/{down} of the image, × {factor} "
                            f"against 1/{r_down}, × {r_factor}): diffusers hands the base's latents to the refiner as "
                            "they are, so both must share the VAE's scale")
    check_refiner_share(refiner, config)
    if ensemble_shares(base.scheduler, config.steps, config.refiner_start)[0] < 1:
        raise SlimDiffError(f"{_handover(config.steps, config.refiner_start)} leave the base model no step (it runs "
                            "the timesteps at or above the cut-off): raise --steps or --refiner-start")


def handed_latents(base: Any, prompts: Sequence[str], generators: Sequence[torch.Generator], steps: int,
                   start: float, height: int, width: int, guidance: dict) -> torch.Tensor:
    """The latents ``base`` hands its refiner in diffusers' ensemble: each prompt sampled from its seeded latent (its
    generator's first draw, :func:`image_generators`) over ``steps`` to ``denoising_end=start``; ``guidance``: the
    call's guidance argument, if any."""
    unet, scale = base.unet, base.vae_scale_factor
    latents = family_for(base).seeded_latents(unet.config, (height // scale, width // scale), generators)
    return base(list(prompts), num_inference_steps=steps, **guidance, latents=latents.to(unet.device, unet.dtype),
                generator=generators, height=height, width=width, denoising_end=start, output_type="latent").images


def ensemble_loop(base: Any, refiner: Any, config: Any, source: str | None = None
                  ) -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: diffusers' ensemble of expert denoisers on one batch, to latents — ``base`` samples
    the schedule of ``config.steps`` from seeded latents (one generator per prompt, :func:`image_generators`) to
    ``denoising_end=config.refiner_start``, and ``refiner`` denoises its latents from ``denoising_start`` on with the
    same prompts, guidance and generators. Calibration hooks the refiner's UNet: it sees exactly the timesteps and
    inputs it sees when served after the base. Checked first (:func:`check_base`; ``source``: the base's name in the
    error lines)."""
    check_base(base, refiner, config, source)
    start, native = config.refiner_start, base.unet.config.sample_size * base.vae_scale_factor
    height, width = config.height or native, config.width or native

    def run(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        generators = image_generators(seeds)
        handed = handed_latents(base, prompts, generators, config.steps, start, height, width, guidance(config))
        refiner(list(prompts), image=handed, num_inference_steps=config.steps, **guidance(config),
                denoising_start=start, generator=generators, output_type="latent")

    return run


@FAMILIES.register({StableDiffusionXLImg2ImgPipeline: "sdxl-refiner", UNet2DConditionModel: "sdxl-refiner"})
class StableDiffusionXLRefinerFamily(StableDiffusionXLFamily):
    """SDXL's call with the refiner's five time ids; the second text tower only; image-to-image sampling."""

    name = "sdxl-refiner"
    time_ids = REFINER_TIME_IDS
    serving_pipeline = "StableDiffusionXLImg2ImgPipeline"
    serving_image_inputs = ("image",)
    # the refiner is an image-to-image model already; diffusers has no refiner ControlNet pipeline
    serving_controlnet_pipeline = serving_img2img_pipeline = serving_controlnet_img2img_pipeline = None
    serving_refiner_family = None
    # measuring calls refine an image: they start from its noised latent, not from seeded ones
    measures_from_latents = False
    export_options = ()

    def accepts(self, obj: Any) -> bool:
        unet = _unet_of(obj)
        return unet is not None and is_refiner_unet(unet.config)

    def condition_inputs(self, config: Any) -> tuple[ConditionInput, ...]:
        return (ConditionInput("text_embeds", ("batch", pooled_width(config, self.time_ids)), MODEL_DTYPE),
                ConditionInput("time_ids", ("batch", self.time_ids), "float32", high=1024.0))

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        h, w = size
        # original size, crop top-left, the prompt's aesthetic score: what the pipeline passes for an uncropped image
        score = pipeline_call_default(pipe, "aesthetic_score")
        return {"encoder_hidden_states": embeds, "text_embeds": pooled,
                "time_ids": time_ids_of([h, w, 0, 0, score], device), **guidance_embedding(pipe, device)}

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return refiner_loop(pipe, config)

    def base_calibration_loop(self, pipe: Any, config: Any, load_base: Callable[[], Any]
                              ) -> Callable[[Sequence[str], Sequence[int]], None]:
        check_refiner_share(pipe, config)  # before the base loads
        base = load_base()
        loop = ensemble_loop(base, pipe, config, config.base)  # checked on the host
        base.to(pipe.unet.device)
        return loop

    def text_towers(self, pipe: Any) -> list[TextTower]:
        return [TextTower(pipe.tokenizer_2, pipe.text_encoder_2)]

    def measuring_call(self, height: int, width: int, images: Sequence | None = None,
                       seeds: Sequence[int] = ()) -> dict:
        from PIL import Image

        start = [colour_ramp()] if images is None else list(images)  # a colour ramp: structure, no file
        return {"image": [im.resize((width, height), Image.Resampling.BICUBIC) for im in start],
                **self.pipeline_options}

    def served_text_encoders(self, pipe: Any) -> tuple[ServedTextEncoder, ...]:
        return (ServedTextEncoder("text_encoder_2", "tokenizer_2", (PENULTIMATE_HIDDEN_STATE, TEXT_EMBEDS)),)

    def serving_options(self, pipe: Any) -> dict:
        # no first text tower (the constructor requires the arguments); the refiner's aesthetic-score time ids
        return {**super().serving_options(pipe), "text_encoder": None, "tokenizer": None,
                "requires_aesthetics_score": True}
