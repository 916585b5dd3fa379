"""The SDXL family: ``StableDiffusionXLPipeline`` and its ``UNet2DConditionModel`` with
``addition_embed_type="text_time"``.

Beyond SD's call, every step passes ``added_cond_kwargs = {"text_embeds": pooled, "time_ids": micro}``: the
pooled, projected output of the second text encoder (1280 wide in SDXL-base) and six micro-conditioning numbers
(original size, crop top-left, target size). The UNet embeds each time id sinusoidally
(``addition_time_embed_dim`` wide) and feeds ``[text_embeds, embedded time ids]`` —
``projection_class_embeddings_input_dim`` wide — through ``add_embedding`` into the timestep embedding. The
prompt embedding is both encoders' penultimate hidden states side by side (768 + 1280 = 2048 in SDXL-base).
The pipeline's own loop (SD's calibration loop drives it unchanged) computes all of it, with guidance.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline, UNet2DConditionModel

from ..errors import SlimDiffError
from .base import (
    FAMILIES,
    MODEL_DTYPE,
    PENULTIMATE_HIDDEN_STATE,
    TEXT_EMBEDS,
    ConditionInput,
    ServedTextEncoder,
    TextTower,
)
from .sd import StableDiffusionFamily, _unet_of, guidance_embedding

#: Micro-conditioning numbers per sample in a base model: (original h, w, crop top, left, target h, w).
BASE_TIME_IDS = 6
#: ... and in the refiner (:mod:`.refiner`): (original h, w, crop top, left, aesthetic score).
REFINER_TIME_IDS = 5


def is_refiner_unet(config: Any) -> bool:
    """A ``text_time`` UNet taking the refiner's five time ids: its pooled text embedding, what ``add_embedding``
    takes beyond five embedded time ids, is as wide as its text context — the refiner is conditioned on one tower,
    whose projected pooled output is as wide as its hidden states (1280 in SDXL-refiner 1.0). The base takes six
    beside the pooled output of a narrower second tower (2816 − 5·256 = 1536 ≠ its 2048-wide context)."""
    return (config.get("addition_embed_type") == "text_time"
            and config["projection_class_embeddings_input_dim"] - REFINER_TIME_IDS * config["addition_time_embed_dim"]
            == config["cross_attention_dim"])


@FAMILIES.register({StableDiffusionXLPipeline: "sdxl", UNet2DConditionModel: "sdxl", ControlNetModel: "sdxl"})
class StableDiffusionXLFamily(StableDiffusionFamily):
    """SD's call plus ``added_cond_kwargs`` (``text_embeds``, ``time_ids``); two text towers."""

    name = "sdxl"
    #: How many micro-conditioning numbers ``time_ids`` holds per sample.
    time_ids = BASE_TIME_IDS

    def accepts(self, obj: Any) -> bool:
        unet = _unet_of(obj)
        return (unet is not None and unet.config.get("addition_embed_type") == "text_time"
                and not is_refiner_unet(unet.config))

    def condition_inputs(self, config: Any) -> tuple[ConditionInput, ...]:
        return (
            *super().condition_inputs(config),
            ConditionInput("text_embeds", ("batch", pooled_width(config, self.time_ids)), MODEL_DTYPE),
            # float32 even in fp16 engines, as the timestep: pixel sizes such as 1024 go through a sinusoidal
            # embedding that diffusers computes in float32. Parity checks draw sizes below 1024 px.
            ConditionInput("time_ids", ("batch", self.time_ids), "float32", high=1024.0),
        )

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        h, w = size
        # original size, crop top-left, target size: what the pipeline passes for an uncropped image
        return {"encoder_hidden_states": embeds, "text_embeds": pooled,
                "time_ids": time_ids_of([h, w, 0, 0, h, w], device), **guidance_embedding(pipe, device)}

    def text_towers(self, pipe: Any) -> list[TextTower]:
        return [TextTower(pipe.tokenizer, pipe.text_encoder), TextTower(pipe.tokenizer_2, pipe.text_encoder_2)]

    serving_pipeline = "StableDiffusionXLPipeline"
    serving_controlnet_pipeline = "StableDiffusionXLControlNetPipeline"
    serving_img2img_pipeline = "StableDiffusionXLImg2ImgPipeline"
    serving_controlnet_img2img_pipeline = "StableDiffusionXLControlNetImg2ImgPipeline"
    serving_refiner_family = "sdxl-refiner"
    upcasts_vae = True

    def served_text_encoders(self, pipe: Any) -> tuple[ServedTextEncoder, ...]:
        # The prompt embedding is both encoders' penultimate hidden states side by side; the pooled text_embeds
        # (added conditioning) come from the second, projecting one.
        return (ServedTextEncoder("text_encoder", "tokenizer", (PENULTIMATE_HIDDEN_STATE,)),
                ServedTextEncoder("text_encoder_2", "tokenizer_2", (PENULTIMATE_HIDDEN_STATE, TEXT_EMBEDS)))

    def serving_options(self, pipe: Any) -> dict:
        # no invisible-watermark step: the served image is the model's (and the package is optional in diffusers)
        return {"force_zeros_for_empty_prompt": bool(pipe.config.force_zeros_for_empty_prompt),
                "add_watermarker": False}


def pooled_width(config: Any, time_ids: int) -> int:
    """Width of ``text_embeds``: what ``add_embedding`` takes minus ``time_ids`` embedded time ids."""
    width = config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
    if width <= 0:
        raise SlimDiffError(f"UNet config: projection_class_embeddings_input_dim "
                            f"{config['projection_class_embeddings_input_dim']} leaves no room for "
                            f"{time_ids} time ids of width {config['addition_time_embed_dim']}")
    return width


def time_ids_of(numbers: list[float], device: str | torch.device) -> torch.Tensor:
    """One sample's ``time_ids``, float32 (as the pipelines make them)."""
    return torch.tensor([numbers], dtype=torch.float32, device=device)
