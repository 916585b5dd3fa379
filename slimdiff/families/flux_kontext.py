"""FLUX Kontext: ``FluxKontextPipeline`` (FLUX.1-Kontext-dev, image editing) around a ``FluxTransformer2DModel``.

The transformer has FLUX.1-dev's configuration (64 features in and out): what differs is the call. The pipeline
VAE-encodes a reference image (the image to edit: the posterior's mode, no draw), packs it and appends its tokens
after the latent's along the sequence — ``hidden_states = cat([latents, image_latents], 1)``, ``img_ids =
cat([latent_ids, image_ids])`` with the reference's first position coordinate 1 — and keeps only the first N
predictions, the latent's. The blocks see both token sets (a 1024² edit of a 1024² image: 8,192 image tokens), and
calibration's statistics cover both: the latent's tokens attend to the reference's, so a slim block must keep what
either carries. Timesteps are indexed as FLUX's (sigma × 1000).

Its configuration being FLUX.1-dev's, a bare transformer cannot say it is Kontext's: ``family_for`` of a transformer
answers ``flux``, and the family is registered for the pipeline class only. What the pipeline's family decides —
calibration, measuring runs, the exported call — is taken from the pipeline (``family_for(pipe)``) or, for a slim
transformer folder, from the family its plan records (``family`` in the plan's info, :func:`family_named`); a bare
transformer folder exports as FLUX's text-to-image graph.

Sizes. The pipeline resizes the reference to one of Kontext's preferred resolutions (about 1 MP) and scales the
output to ``max_area`` (1 MP) whatever ``height`` and ``width`` say. Calibration and the measuring runs instead draw
at the size asked for (``max_area`` = height × width) and resize the reference to that size themselves (the
pipeline's ``_auto_resize`` off): a 1024² calibration equals the pipeline's default for square images, and the
tiny models stay tiny. Calibration conditions on the images of ``--images`` (one per prompt in turn); the
benchmark's end-to-end runs and ``slimdiff eval`` on a colour ramp or the given images. A served request (a Triton
repository's ``FluxKontextPipeline``) draws at its ``height`` and ``width`` (default: its image's size), the image
at its own size (the pipeline's resizing off: it rounds the size down to its multiple).

Exported graphs take the latent unpacked, (batch, 16, height, width), and the reference image's latent unpacked,
(batch, 16, reference height, reference width) on axes of its own (:data:`~slimdiff.families.base.PAIRED_AXES`),
pack both, build both position grids and return the latent's prediction alone, unpacked.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import FluxKontextPipeline
from torch import nn

from .base import FAMILIES, MODEL_DTYPE, REFERENCE_HEIGHT, REFERENCE_WIDTH, ExportInput
from .flux import (
    PACK,
    FluxFamily,
    latent_features,
    latent_ids,
    pack_latents,
    packed_call,
    seeded_sampling_loop,
    split_packed_call,
    unpack_latents,
)
from .images import calibration_images, colour_ramp, images_of_seeds

#: The pipeline's argument for the image to edit (and the served request's input).
REFERENCE = "image"
#: The exported input carrying the reference image's latent, unpacked.
REFERENCE_LATENTS = "reference_latents"
#: What every call passes: the pipeline's own resizing of the reference to a preferred resolution off (calibration
#: and the measuring runs resize it to the image size; a served request's is taken at its own size).
KONTEXT_OPTIONS = {"_auto_resize": False}


def area(height: int, width: int) -> dict:
    """``max_area`` of a call drawing a ``height`` × ``width`` px image: the pipeline scales the image to that area
    (1 MP by default) whatever ``height`` and ``width`` say."""
    return {"max_area": height * width}


def sized_call(height: int, width: int, images: Sequence) -> dict:
    """The arguments of a ``FluxKontextPipeline`` call that draw a ``height`` × ``width`` px image editing
    ``images`` resized to that size (LANCZOS, as the pipeline's image processor resizes)."""
    from PIL import Image

    resized = [image.resize((width, height), Image.LANCZOS) for image in images]
    return {REFERENCE: resized, "height": height, "width": width, **area(height, width), **KONTEXT_OPTIONS}


def kontext_loop(family: FluxFamily, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: ``FluxKontextPipeline``'s own sampling of one batch — prompt ``i`` edits
    ``images[seed mod count]`` — from seeded packed latents to latents."""
    files = calibration_images(config.images, "FLUX Kontext is calibrated on the images it edits",
                               example="a few hundred COCO photographs, of the kind the model edits")
    return seeded_sampling_loop(family, pipe, config, lambda seeds, height, width: sized_call(
        height, width, images_of_seeds(files, seeds)))


@FAMILIES.register({FluxKontextPipeline: "flux-kontext"})
class FluxKontextFamily(FluxFamily):
    """FLUX's blocks and sites; the call carries the reference image's tokens after the latent's; sampling edits an
    image."""

    name = "flux-kontext"
    export_options = ()  # its pipeline takes no ControlNet
    serving_pipeline = "FluxKontextPipeline"
    serving_img2img_pipeline = None
    serving_image_inputs = serving_encoded_images = (REFERENCE,)
    noises_image = False  # the reference conditions the sampling, which starts from noise
    pipeline_options = KONTEXT_OPTIONS

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return kontext_loop(self, pipe, config)

    def sized_options(self, height: int, width: int) -> dict:
        return area(height, width)

    def measuring_call(self, height: int, width: int, images: Sequence | None = None,
                       seeds: Sequence[int] = ()) -> dict:
        # one colour ramp for the whole batch (the pipeline repeats it), or the given images, one per image drawn
        return sized_call(height, width, [colour_ramp()] if images is None else images)

    # -- the exported call: the latent and the reference's latent, unpacked, on axes of their own -------------

    def export_inputs(self, config: Any) -> tuple[ExportInput, ...]:
        latent, *rest = super().export_inputs(config)
        reference = ExportInput(REFERENCE_LATENTS, ("batch", latent_features(config) // PACK**2, REFERENCE_HEIGHT,
                                                    REFERENCE_WIDTH), MODEL_DTYPE)
        return (latent, reference, *rest)

    def export_call(self, transformer: nn.Module, hidden_states: torch.Tensor, reference_latents: torch.Tensor,
                    timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                    guidance: torch.Tensor | None = None) -> torch.Tensor:
        (height, width), (ref_height, ref_width) = hidden_states.shape[-2:], reference_latents.shape[-2:]
        device = hidden_states.device
        tokens = torch.cat([pack_latents(hidden_states), pack_latents(reference_latents)], 1)
        img_ids = torch.cat([latent_ids(height // PACK, width // PACK, device=device),
                             latent_ids(ref_height // PACK, ref_width // PACK, first=1, device=device)])
        out = packed_call(transformer, tokens, img_ids, timestep, encoder_hidden_states, pooled_projections, guidance)
        return unpack_latents(out[:, :(height // PACK) * (width // PACK)], height, width)

    def exported_from_call(self, call: dict[str, Any]) -> tuple[dict[str, Any], Callable[[torch.Tensor], torch.Tensor]]:
        # the pipeline's packed call split into the latent and the reference, unpacked; the prediction the
        # exported call returns is the latent's, which is all the pipeline keeps of the transformer's
        call, ((rows, columns), (ref_rows, ref_columns)) = split_packed_call(call, "FluxKontextPipeline",
                                                                             reference=True)
        packed, latent = call["hidden_states"], rows * columns
        call["hidden_states"] = unpack_latents(packed[:, :latent], rows * PACK, columns * PACK)
        call[REFERENCE_LATENTS] = unpack_latents(packed[:, latent:], ref_rows * PACK, ref_columns * PACK)
        return call, pack_latents

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        # the timed calls' reference: the measuring runs' colour ramp at the image size, encoded as the pipeline
        # encodes it (the posterior's mode)
        height, width = size
        image = pipe.image_processor.preprocess(sized_call(height, width, [colour_ramp()])[REFERENCE], height, width)
        vae = pipe.vae
        reference = pipe._encode_vae_image(image.to(device=vae.device, dtype=vae.dtype), generator=None)
        return {**super().prompt_inputs(pipe, prompt, size, device), REFERENCE_LATENTS: reference.to(device)}

    def dummy_call(self, config: Any, batch: int, latent: tuple[int, int], text_tokens: int | None = None, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        # a reference of the latent's size: the sequence the blocks see doubles
        call = super().dummy_call(config, batch, latent, text_tokens, device=device, dtype=dtype)
        h, w = latent
        call["hidden_states"] = torch.cat([call["hidden_states"]] * 2, 1)
        call["img_ids"] = torch.cat([call["img_ids"], latent_ids(h // PACK, w // PACK, first=1, device=device)])
        return call
