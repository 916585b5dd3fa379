"""FLUX Control: ``FluxControlPipeline`` (FLUX.1-Depth-dev, FLUX.1-Canny-dev: structural conditioning trained into the
model, no ControlNet) and its ``FluxTransformer2DModel``.

The transformer is FLUX.1-dev's with a wider input: each packed token carries the noisy latent and the latent of the
control image (a depth map, an edge map: the VAE's encoding of it, packed) side by side — 64 + 64 = 128 features —
and it predicts the latent's 64. Blocks, sites, call and engines are FLUX's (:mod:`slimdiff.families.flux`): the
exported graph takes the input unpacked, (batch, 32, height, width), and packs it as the pipeline does.

What differs is the sampling. Calibration runs ``FluxControlPipeline`` from seeded packed latents on the control
images of ``CalibrationConfig.images`` (``--images``: control maps of the kind the model serves, one per prompt in
turn; the pipeline resizes them); the benchmark's end-to-end runs and ``slimdiff eval`` condition on a colour ramp
(a smooth stand-in with structure) or on the given images; served requests carry the control image, which the
repository's VAE encoder encodes.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable, Sequence

from diffusers import FluxControlPipeline, FluxTransformer2DModel

from .base import FAMILIES
from .flux import FluxFamily, _transformer_of, input_features, latent_features, seeded_sampling_loop
from .images import calibration_images, colour_ramp, images_of_seeds

CONTROL_IMAGE = "control_image"


def is_control_transformer(config: Any) -> bool:
    """A FLUX transformer whose tokens carry the latent and a control image's latent: ``in_channels`` twice the
    latent's features."""
    return input_features(config) == 2 * latent_features(config)


def control_loop(family: FluxFamily, pipe: Any, config: Any, model: str = "FLUX Control",
                 kind: str = "the model serves") -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: a FLUX pipeline's own sampling of one batch conditioned on a control image — prompt
    ``i`` on ``images[seed mod count]`` — from seeded packed latents to latents (the control image's latent is a
    sample of the VAE's posterior: drawn by each prompt's generator as well). ``model`` and ``kind`` name what is
    calibrated in the line that asks for ``--images``."""
    files = calibration_images(config.images, f"{model} is calibrated on control images",
                               example=f"a few hundred depth or edge maps, of the kind {kind}")
    return seeded_sampling_loop(family, pipe, config, lambda seeds, height, width: {
        CONTROL_IMAGE: images_of_seeds(files, seeds), "height": height, "width": width})


class ControlImageTask:
    """A family whose pipeline is conditioned on a control image: its measuring runs' control image, a colour ramp,
    or the images given to ``slimdiff eval --images``, one per image drawn."""

    @cached_property
    def pipeline_options(self) -> dict:
        return {CONTROL_IMAGE: colour_ramp()}  # the pipeline resizes it

    def measuring_call(self, height: int, width: int, images: Sequence | None = None,
                       seeds: Sequence[int] = ()) -> dict:
        call = super().measuring_call(height, width)  # the family this task is mixed into
        if images is not None:
            call[CONTROL_IMAGE] = list(images)
        return call


@FAMILIES.register({FluxControlPipeline: "flux-control", FluxTransformer2DModel: "flux-control"})
class FluxControlFamily(ControlImageTask, FluxFamily):
    """FLUX's call and blocks with the latent and the control image's latent in each token; sampling conditioned on
    a control image."""

    name = "flux-control"
    export_options = ()  # its pipeline takes no ControlNet
    serving_pipeline = "FluxControlPipeline"
    serving_img2img_pipeline = None
    serving_image_inputs = serving_encoded_images = (CONTROL_IMAGE,)

    def accepts(self, obj: Any) -> bool:
        transformer = _transformer_of(obj)
        return transformer is not None and is_control_transformer(transformer.config)

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return control_loop(self, pipe, config)

