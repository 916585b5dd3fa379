"""The SD-1.x / SD-2.x family: ``StableDiffusionPipeline`` and its ``UNet2DConditionModel`` (no added
conditioning: SDXL's ``text_time`` embeddings belong to the SDXL family)."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

from ..errors import SlimDiffError
from .base import (
    CONTROLNET_RESIDUALS,
    CONTROLNETS,
    FAMILIES,
    LAST_HIDDEN_STATE,
    MODEL_DTYPE,
    TIMESTEP,
    ConditionInput,
    ControlNetAdapter,
    DenoiserFamily,
    ExportInput,
    ServedTextEncoder,
    TextTower,
    downsampled_axis,
    image_generators,
    pipeline_call_default,
)


def _unet_of(obj: Any):
    """The UNet of a pipeline, or ``obj`` itself: a UNet, or a ControlNet (its config and call are a UNet's)."""
    return obj if isinstance(obj, (UNet2DConditionModel, ControlNetModel)) else getattr(obj, "unet", None)


def seeded_latents(denoiser: nn.Module, vae_scale: int, config: Any, generators: Sequence[torch.Generator]
                   ) -> torch.Tensor:
    """Initial latents of a calibration batch at ``config``'s size (default: the denoiser's), one draw per prompt
    by the prompt's generator (:func:`~.base.image_generators`), so a prompt's trajectory does not depend on
    batching or device; on the denoiser's device/dtype."""
    cfg = denoiser.config
    h = (config.height or cfg.sample_size * vae_scale) // vae_scale
    w = (config.width or cfg.sample_size * vae_scale) // vae_scale
    latents = torch.cat([torch.randn((1, cfg.in_channels, h, w), generator=g) for g in generators])
    return latents.to(device=denoiser.device, dtype=denoiser.dtype)


def guidance(config: Any) -> dict:
    """The guidance argument of a pipeline call: the calibration's scale, or none (the pipeline's own default)."""
    return {} if config.guidance_scale is None else {"guidance_scale": config.guidance_scale}


def sampling_loop(pipe: Any, denoiser: nn.Module, config: Any,
                  **call_options: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: ``pipe``'s own sampling of one batch of prompts from :func:`seeded_latents` at
    ``config``'s steps, size and guidance, to latents (``call_options``: what a pipeline's call needs beyond); each
    prompt's generator goes on drawing what the sampler draws (an LCM or ancestral scheduler's noise)."""
    def run(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        scale = pipe.vae_scale_factor
        generators = image_generators(seeds)
        latents = seeded_latents(denoiser, scale, config, generators)
        pipe(list(prompts), num_inference_steps=config.steps, **guidance(config), latents=latents,
             generator=generators, output_type="latent", height=latents.shape[-2] * scale,
             width=latents.shape[-1] * scale, **call_options)

    return run


#: The input of a guidance-distilled (LCM) UNet's call that carries the embedded guidance scale.
GUIDANCE_EMBEDDING = "timestep_cond"


def guidance_embedding(pipe: Any, device: str | torch.device) -> dict[str, torch.Tensor]:
    """``{"timestep_cond": ...}`` for one image as ``pipe`` makes it for a UNet that embeds the guidance scale (LCM:
    the sinusoidal embedding of the pipeline's default guidance scale minus one), or nothing for other UNets."""
    width = pipe.unet.config.get("time_cond_proj_dim")
    if not width:
        return {}
    scale = pipeline_call_default(pipe, "guidance_scale")
    w = torch.tensor([scale - 1.0])
    return {GUIDANCE_EMBEDDING: pipe.get_guidance_scale_embedding(w, embedding_dim=width).to(device)}


#: Names of the ControlNet residual inputs of an engine built with :data:`CONTROLNET_RESIDUALS`: one per skip
#: connection (``down_block_additional_residual_0`` ...), then the mid block's.
DOWN_RESIDUAL = "down_block_additional_residual_{}"
MID_RESIDUAL = "mid_block_additional_residual"
#: The down blocks whose skip connections diffusers' ControlNet mirrors: one per resnet, one per down-sampler.
_CONTROLNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")


def controlnet_residual_inputs(config: Any) -> tuple[ExportInput, ...]:
    """The residuals a ControlNet adds to a UNet of ``config``, as exported inputs: one per skip connection the UNet
    keeps for its up blocks — ``conv_in``'s output, then every resnet's and every down-sampler's output of each down
    block (``block_out_channels[i]`` channels at level i, latent size / 2^i; a down-sampler's output is already one
    level down) — and one for the mid block's output (the last level). What diffusers' ``UNet2DConditionModel``
    sums ``down_block_additional_residuals`` and ``mid_block_additional_residual`` into."""
    others = sorted(set(config["down_block_types"]) - set(_CONTROLNET_DOWN_BLOCKS))
    if others:
        raise SlimDiffError(f"UNets with {', '.join(others)} down blocks cannot be exported with ControlNet residual "
                            f"inputs yet (only {' and '.join(_CONTROLNET_DOWN_BLOCKS)})")
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    levels = [(channels[0], 1)]  # conv_in's output
    for i, width in enumerate(channels):
        levels += [(width, 2 ** i)] * layers[i]
        if i < len(channels) - 1:  # every down block but the last ends with a down-sampler
            levels.append((width, 2 ** (i + 1)))
    levels.append((channels[-1], 2 ** (len(channels) - 1)))  # the mid block's
    names = [DOWN_RESIDUAL.format(i) for i in range(len(levels) - 1)] + [MID_RESIDUAL]
    return tuple(ExportInput(name, ("batch", width, downsampled_axis("height", f), downsampled_axis("width", f)),
                             MODEL_DTYPE) for name, (width, f) in zip(names, levels))


def controlnet_scale(config: Any) -> int:
    """How much smaller the latent is than a ControlNet's conditioning image: its conditioning embedding halves the
    image between each of its widths (SD's (16, 32, 96, 256): 8, the VAE's scale)."""
    return 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)


#: The exported input of a ControlNet engine carrying the conditioning image, folded onto the latent grid.
FOLDED_CONTROLNET_COND = "folded_controlnet_cond"


@CONTROLNETS.register({ControlNetModel: "controlnet"})
class UNetControlNet(ControlNetAdapter):
    """SD's and SDXL's ``ControlNetModel``: the UNet's call (its family's inputs and conditions) and the conditioning
    image, folded onto the latent grid (``pixel_unshuffle``, undone in the call, as for the VAE encoder); out: one
    residual per skip connection of the UNet and the mid block's (:func:`controlnet_residual_inputs`)."""

    # what its residuals' shapes and its text conditioning follow (an LCM UNet's guidance embedding is the UNet's
    # alone: the pipelines pass no timestep_cond to the ControlNet)
    _SHARED_CONFIG = ("block_out_channels", "down_block_types", "layers_per_block", "transformer_layers_per_block",
                      "cross_attention_dim", "addition_embed_type")

    def check_made_for(self, controlnet: Any, denoiser_config: Any, what: str) -> None:
        if "block_out_channels" not in denoiser_config:
            raise SlimDiffError(f"{what} is a UNet's ControlNet ({type(controlnet).__name__}): export it with an SD or "
                                "SDXL model")
        config = controlnet.config
        differ = [f"{k} {config.get(k)!r} vs the UNet's {denoiser_config.get(k)!r}" for k in self._SHARED_CONFIG
                  if json.dumps(config.get(k)) != json.dumps(denoiser_config.get(k))]
        if differ:
            raise SlimDiffError(f"{what} was not made for this UNet: {'; '.join(differ[:2])}")
        # the pipelines pass it the latent alone, also beside an inpainting UNet's mask and masked-image channels
        latent = denoiser_config.get("out_channels")
        if config.get("in_channels") != latent:
            raise SlimDiffError(f"{what} takes {config.get('in_channels')} input channels; its pipeline passes it the "
                                f"{latent}-channel latent")

    def export_inputs(self, controlnet: Any) -> tuple[ExportInput, ...]:
        config = controlnet.config
        channels = config["conditioning_channels"] * controlnet_scale(config) ** 2
        return (*self.family(controlnet).export_inputs(config),
                ExportInput(FOLDED_CONTROLNET_COND, ("batch", channels, "height", "width"), MODEL_DTYPE))

    def export_outputs(self, controlnet: Any) -> tuple[str, ...]:
        return tuple(r.name for r in controlnet_residual_inputs(controlnet.config))

    def export_call(self, controlnet: Any, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        family, config = self.family(controlnet), controlnet.config
        sample, timestep, encoder_hidden_states, *conditions, folded = inputs
        call = family.condition_call(config, {c.name: t for c, t in zip(family.condition_inputs(config), conditions)})
        down, mid = controlnet(sample, timestep, encoder_hidden_states,
                               controlnet_cond=nn.functional.pixel_shuffle(folded, controlnet_scale(config)),
                               conditioning_scale=1.0, return_dict=False, **call)
        return (*down, mid)


@FAMILIES.register({StableDiffusionPipeline: "sd", UNet2DConditionModel: "sd", ControlNetModel: "sd"})
class StableDiffusionFamily(DenoiserFamily):
    """``unet(sample, timestep, encoder_hidden_states)``; one CLIP text tower; the pipeline's own sampler."""

    name = "sd"
    export_options = (CONTROLNET_RESIDUALS,)

    def accepts(self, obj: Any) -> bool:
        unet = _unet_of(obj)
        return unet is not None and unet.config.get("addition_embed_type") is None

    def build(self, config: dict) -> nn.Module:
        return UNet2DConditionModel.from_config(dict(config))

    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return kwargs.get("timestep", args[1] if len(args) > 1 else None)

    def text_context(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)

    def dummy_call(self, config: Any, batch: int, latent: tuple[int, int], text_tokens: int | None = None, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        h, w = latent
        text_tokens = text_tokens or self.text_tokens
        return {"sample": torch.zeros(batch, config["in_channels"], h, w, device=device, dtype=dtype),
                "timestep": torch.zeros(batch, device=device, dtype=torch.long),
                "encoder_hidden_states": torch.zeros(batch, text_tokens, config["cross_attention_dim"],
                                                     device=device, dtype=dtype),
                **self.condition_call(config, self.condition_zeros(config, batch, device, dtype))}

    def condition_inputs(self, config: Any) -> tuple[ConditionInput, ...]:
        # A guidance-distilled UNet (LCM) embeds the guidance scale: the pipeline passes its sinusoidal embedding as
        # ``timestep_cond``, which the UNet projects (``time_embedding.cond_proj``) into the timestep embedding.
        width = config.get("time_cond_proj_dim")
        return (ConditionInput(GUIDANCE_EMBEDDING, ("batch", width), MODEL_DTYPE, keyword=True),) if width else ()

    def guided_rows_per_image(self, config: Any) -> int:
        # diffusers' SD pipelines skip classifier-free guidance for a UNet that embeds the guidance scale
        return 1 if config.get("time_cond_proj_dim") else 2

    def export_inputs(self, config: Any) -> tuple[ExportInput, ...]:
        unsupported = [f"{key}={config.get(key)!r}" for key in ("class_embed_type", "num_class_embeds")
                       if config.get(key)]
        if unsupported:
            raise SlimDiffError(f"UNets with {', '.join(unsupported)} (class labels) cannot be exported yet")
        return (
            ExportInput("sample", ("batch", config["in_channels"], "height", "width"), MODEL_DTYPE),
            # float32 even in fp16 engines: diffusers computes the sinusoidal embedding in float32 anyway.
            ExportInput("timestep", ("batch",), "float32", draw=TIMESTEP),
            ExportInput("encoder_hidden_states", ("batch", "text_len", config["cross_attention_dim"]), MODEL_DTYPE),
            *(ExportInput(c.name, c.dims, c.dtype, high=c.high) for c in self.condition_inputs(config)),
            *(controlnet_residual_inputs(config) if CONTROLNET_RESIDUALS in self.exporting else ()),
        )

    def export_call(self, unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        condition_inputs = self.condition_inputs(unet.config)
        conditions, residuals = extra[:len(condition_inputs)], extra[len(condition_inputs):]
        call = self.condition_call(unet.config, {c.name: t for c, t in zip(condition_inputs, conditions)})
        if CONTROLNET_RESIDUALS in self.exporting:
            *down, mid = residuals
            call.update(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **call)[0]

    def latent_multiple(self, config: Any) -> int:
        # every down-sampling level halves the latent, and the skip connections need it to divide evenly
        return 2 ** (len(config["down_block_types"]) - 1)

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        # keywords: SDXL's encode_prompt takes a second prompt in the second position
        embeds = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds[0], **guidance_embedding(pipe, device)}

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return sampling_loop(pipe, pipe.unet, config)

    def text_towers(self, pipe: Any) -> list[TextTower]:
        return [TextTower(pipe.tokenizer, pipe.text_encoder)]

    serving_pipeline = "StableDiffusionPipeline"
    serving_controlnet_pipeline = "StableDiffusionControlNetPipeline"
    serving_img2img_pipeline = "StableDiffusionImg2ImgPipeline"
    serving_controlnet_img2img_pipeline = "StableDiffusionControlNetImg2ImgPipeline"

    def served_text_encoders(self, pipe: Any) -> tuple[ServedTextEncoder, ...]:
        return (ServedTextEncoder("text_encoder", "tokenizer", (LAST_HIDDEN_STATE,)),)

    def serving_options(self, pipe: Any) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
