"""Inpainting UNets: ``StableDiffusionInpaintPipeline`` (SD-1.5 / SD-2 inpainting) and
``StableDiffusionXLInpaintPipeline`` (SDXL inpainting) with a UNet whose input is the noisy latent, the mask
(one channel, at latent size) and the masked image's latent side by side: ``in_channels = 2 · latent + 1`` (9).

The transformer blocks are SD's and SDXL's, and so are their sites, export and engines (the exporter reads
``in_channels`` from the config). What differs is the sampling that calibration runs: the pipeline needs an image
and a mask for every prompt. Calibration takes the images from ``CalibrationConfig.images`` (a folder, e.g. COCO
photographs: ``--images``), one per prompt in turn, each with a seeded random rectangular hole covering 9–64 % of
it, so a prompt's image and mask do not depend on batching. The benchmark's end-to-end runs and ``slimdiff eval``
use one fixed synthetic task instead — a grey canvas with a centred hole (the families' ``pipeline_options``): they
time and compare the models, they do not need photographs.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable, Sequence

import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel

from .base import FAMILIES, image_generators, starting_latents
from .images import calibration_images, images_of_seeds
from .sd import StableDiffusionFamily, _unet_of, guidance
from .sdxl import StableDiffusionXLFamily

#: Side of a hole as a fraction of the image's (each side drawn on its own): 0.3–0.8 → 9–64 % of the area.
HOLE_SIDE = (0.3, 0.8)


def is_inpainting_unet(config: Any) -> bool:
    """A UNet taking the latent, the mask and the masked image's latent: ``in_channels = 2 · out_channels + 1``."""
    return config.get("in_channels") == 2 * config.get("out_channels", 0) + 1


def seeded_hole(seed: int, height: int, width: int):
    """The calibration mask of the prompt sampled with ``seed``: a white (repaint) rectangle on black, L mode."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(int(seed))
    low, high = HOLE_SIDE
    hole_h, hole_w = (round(side * (low + (high - low) * torch.rand((), generator=gen).item()))
                      for side in (height, width))
    top = int(torch.randint(0, height - hole_h + 1, (), generator=gen))
    left = int(torch.randint(0, width - hole_w + 1, (), generator=gen))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((left, top, left + hole_w - 1, top + hole_h - 1), fill=255)
    return mask


def _latents(config: Any, latent: tuple[int, int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One draw per image, by its generator, of the latent the pipeline denoises: the UNet's output channels, not
    its input's."""
    return torch.cat([torch.randn((1, config["out_channels"], *latent), generator=g) for g in generators])


def inpainting_loop(pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: the inpainting pipeline's own sampling of one batch — prompt ``i``'s image is
    ``images[seed mod count]`` with :func:`seeded_hole` of its seed — from seeded latents (or, at a strength below
    1, the image noised by the prompt's generator) to latents."""
    files = calibration_images(config.images, "an inpainting model is calibrated on images with holes")
    unet, scale = pipe.unet, pipe.vae_scale_factor
    height = config.height or unet.config.sample_size * scale
    width = config.width or unet.config.sample_size * scale
    strength = 1.0 if config.strength is None else config.strength

    def run(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        # the masked image's latent is a sample of the VAE's posterior: drawn by each prompt's generator as well
        generators = image_generators(seeds)
        start = starting_latents(strength, lambda: _latents(unet.config, (height // scale, width // scale),
                                                            generators).to(device=unet.device, dtype=unet.dtype))
        images = images_of_seeds(files, seeds)
        masks = [seeded_hole(int(s), height, width) for s in seeds]
        pipe(list(prompts), image=images, mask_image=masks, num_inference_steps=config.steps, **guidance(config),
             height=height, width=width, strength=strength, generator=generators, output_type="latent", **start)

    return run


class InpaintingTask:
    """What an inpainting family — UNet or transformer — adds to its text-to-image family: a served pipeline taking
    the image and the mask, and the synthetic task of measurement (or the given images with calibration's seeded
    holes)."""

    serving_image_inputs = ("image", "mask_image")
    # an inpainting denoiser draws no plain image-to-image; no inpainting ensemble with the refiner is served
    serving_img2img_pipeline = serving_controlnet_img2img_pipeline = None
    serving_refiner_family = None

    @cached_property
    def pipeline_options(self) -> dict:
        """The measuring task: a grey canvas with a centred hole of half its sides (the pipeline resizes both)."""
        from PIL import Image, ImageDraw

        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
        return {"image": Image.new("RGB", (64, 64), (128, 128, 128)), "mask_image": mask, "strength": 1.0}

    def measuring_call(self, height: int, width: int, images: Sequence | None = None,
                       seeds: Sequence[int] = ()) -> dict:
        call = super().measuring_call(height, width)  # the text-to-image family's
        if images is not None:  # the given images, with calibration's seeded holes
            call.update(image=list(images), mask_image=[seeded_hole(int(s), height, width) for s in seeds])
        return call


class _InpaintingUNet(InpaintingTask):
    """What the inpainting UNet families add: the UNet's layout test, the calibration sampling, and seeded latents
    of the latent's channels (not the UNet's input's)."""

    def accepts(self, obj: Any) -> bool:
        unet = _unet_of(obj)
        return unet is not None and is_inpainting_unet(unet.config) and super().accepts(obj)

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return inpainting_loop(pipe, config)

    def seeded_latents(self, config: Any, latent: tuple[int, int], generators: Sequence[torch.Generator]
                       ) -> torch.Tensor:
        return _latents(config, latent, generators)


@FAMILIES.register({StableDiffusionInpaintPipeline: "sd-inpaint", UNet2DConditionModel: "sd-inpaint"})
class StableDiffusionInpaintFamily(_InpaintingUNet, StableDiffusionFamily):
    """SD-1.x / SD-2.x inpainting: SD's UNet call with a 9-channel input."""

    name = "sd-inpaint"
    serving_pipeline = "StableDiffusionInpaintPipeline"
    serving_controlnet_pipeline = "StableDiffusionControlNetInpaintPipeline"


@FAMILIES.register({StableDiffusionXLInpaintPipeline: "sdxl-inpaint", UNet2DConditionModel: "sdxl-inpaint"})
class StableDiffusionXLInpaintFamily(_InpaintingUNet, StableDiffusionXLFamily):
    """SDXL inpainting: SDXL's UNet call (``text_embeds``, ``time_ids``) with a 9-channel input."""

    name = "sdxl-inpaint"
    serving_pipeline = "StableDiffusionXLInpaintPipeline"
    serving_controlnet_pipeline = "StableDiffusionXLControlNetInpaintPipeline"
