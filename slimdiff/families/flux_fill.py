"""FLUX Fill: ``FluxFillPipeline`` (FLUX.1-Fill-dev, FLUX's inpainting and outpainting model) and its
``FluxTransformer2DModel``.

The transformer is FLUX.1-dev's with a wider input: each packed token carries the noisy latent, the masked image's
latent and the mask (the VAE-scale² pixels under each latent pixel as channels) side by side — 64 + 64 + 256 = 384
features in FLUX.1-Fill-dev — and it predicts the latent's 64. Its blocks, sites, call and engines are FLUX's
(:mod:`slimdiff.families.flux`): the exported graph takes the input unpacked, (batch, 96, height, width) — latent,
masked latent and mask channels — and packs it as the pipeline does (packing is channel-major, so the packed parts
side by side are the packing of the channels side by side).

What differs is the sampling. Calibration runs ``FluxFillPipeline`` on images with the seeded holes of the inpainting
UNets (:mod:`slimdiff.families.inpaint`; ``--images``, one per prompt in turn) from seeded packed latents of the
latent's channels; the benchmark's end-to-end runs and ``slimdiff eval`` run the inpainting task (a grey canvas with a
centred hole, or the given images with calibration's holes), and served requests carry the image and the mask.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from diffusers import FluxFillPipeline, FluxTransformer2DModel

from .base import FAMILIES, image_generators, starting_latents
from .flux import PACK, FluxFamily, _transformer_of, calibration_size, input_features, latent_features
from .images import calibration_images, images_of_seeds
from .inpaint import InpaintingTask, seeded_hole
from .sd import guidance


def is_fill_transformer(config: Any) -> bool:
    """A FLUX transformer whose tokens carry the latent, the masked image's latent and a mask of s×s pixels per
    latent pixel, packed: ``in_channels = 2 · out_channels + 4 · s²``."""
    mask = input_features(config) - 2 * latent_features(config)
    pixels = mask // PACK**2
    return mask > 0 and mask % PACK**2 == 0 and math.isqrt(pixels) ** 2 == pixels


def fill_loop(family: FluxFamily, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: ``FluxFillPipeline``'s own sampling of one batch — prompt ``i`` fills
    :func:`~slimdiff.families.inpaint.seeded_hole` of its seed in ``images[seed mod count]`` — from seeded packed
    latents (or, at a strength below 1, the image noised by the prompt's generator) to latents."""
    files = calibration_images(config.images, "FLUX Fill is calibrated on images with holes")
    height, width, latent = calibration_size(pipe, config)
    strength = 1.0 if config.strength is None else config.strength
    transformer = pipe.transformer

    def run(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        generators = image_generators(seeds)
        start = starting_latents(strength, lambda: family.seeded_latents(transformer.config, latent, generators).to(
            device=transformer.device, dtype=transformer.dtype))
        images = images_of_seeds(files, seeds)
        masks = [seeded_hole(int(s), height, width) for s in seeds]
        pipe(list(prompts), image=images, mask_image=masks, num_inference_steps=config.steps, **guidance(config),
             height=height, width=width, strength=strength, generator=generators, output_type="latent", **start)

    return run


@FAMILIES.register({FluxFillPipeline: "flux-fill", FluxTransformer2DModel: "flux-fill"})
class FluxFillFamily(InpaintingTask, FluxFamily):
    """FLUX's call and blocks with the latent, the masked image's latent and the mask in each token; the inpainting
    task's sampling."""

    name = "flux-fill"
    export_options = ()  # its pipeline takes no ControlNet
    serving_pipeline = "FluxFillPipeline"

    def accepts(self, obj: Any) -> bool:
        transformer = _transformer_of(obj)
        return transformer is not None and is_fill_transformer(transformer.config)

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return fill_loop(self, pipe, config)
