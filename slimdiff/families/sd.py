"""The SD-1.x / SD-2.x family: ``StableDiffusionPipeline`` and its ``UNet2DConditionModel`` (no added
conditioning: SDXL's ``text_time`` embeddings belong to the SDXL family)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

from ..errors import SlimDiffError
from .base import (
    FAMILIES,
    LAST_HIDDEN_STATE,
    MODEL_DTYPE,
    TIMESTEP,
    DenoiserFamily,
    ExportInput,
    ServedTextEncoder,
    TextTower,
)


def _unet_of(obj: Any):
    return obj if isinstance(obj, UNet2DConditionModel) else getattr(obj, "unet", None)


def seeded_latents(denoiser: nn.Module, vae_scale: int, config: Any, seeds: Sequence[int]) -> torch.Tensor:
    """Initial latents of a calibration batch at ``config``'s size (default: the denoiser's), one seeded CPU draw
    per prompt, so a prompt's trajectory does not depend on batching or device; on the denoiser's device/dtype."""
    cfg = denoiser.config
    h = (config.height or cfg.sample_size * vae_scale) // vae_scale
    w = (config.width or cfg.sample_size * vae_scale) // vae_scale
    latents = torch.cat([torch.randn((1, cfg.in_channels, h, w), generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds])
    return latents.to(device=denoiser.device, dtype=denoiser.dtype)


def guidance(config: Any) -> dict:
    """The guidance argument of a pipeline call: the calibration's scale, or none (the pipeline's own default)."""
    return {} if config.guidance_scale is None else {"guidance_scale": config.guidance_scale}


def sampling_loop(pipe: Any, denoiser: nn.Module, config: Any,
                  **call_options: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: ``pipe``'s own sampling of one batch of prompts from :func:`seeded_latents` at
    ``config``'s steps, size and guidance, to latents (``call_options``: what a pipeline's call needs beyond)."""
    def run(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        scale = pipe.vae_scale_factor
        latents = seeded_latents(denoiser, scale, config, seeds)
        pipe(list(prompts), num_inference_steps=config.steps, **guidance(config), latents=latents,
             output_type="latent", height=latents.shape[-2] * scale, width=latents.shape[-1] * scale, **call_options)

    return run


@FAMILIES.register({StableDiffusionPipeline: "sd", UNet2DConditionModel: "sd"})
class StableDiffusionFamily(DenoiserFamily):
    """``unet(sample, timestep, encoder_hidden_states)``; one CLIP text tower; the pipeline's own sampler."""

    name = "sd"

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
                                                     device=device, dtype=dtype)}

    def export_inputs(self, config: Any) -> tuple[ExportInput, ...]:
        unsupported = [f"{key}={config.get(key)!r}" for key in ("class_embed_type", "num_class_embeds",
                                                                 "time_cond_proj_dim") if config.get(key)]
        if unsupported:
            raise SlimDiffError(f"UNets with {', '.join(unsupported)} (class labels, LCM guidance embeddings) cannot "
                                "be exported yet")
        return (
            ExportInput("sample", ("batch", config["in_channels"], "height", "width"), MODEL_DTYPE),
            # float32 even in fp16 engines: diffusers computes the sinusoidal embedding in float32 anyway.
            ExportInput("timestep", ("batch",), "float32", draw=TIMESTEP),
            ExportInput("encoder_hidden_states", ("batch", "text_len", config["cross_attention_dim"]), MODEL_DTYPE),
            *(ExportInput(c.name, c.dims, c.dtype, high=c.high) for c in self.condition_inputs(config)),
        )

    def export_call(self, unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        added = {c.name: t for c, t in zip(self.condition_inputs(unet.config), conditions)}
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added or None,
                    return_dict=False)[0]

    def latent_multiple(self, config: Any) -> int:
        # every down-sampling level halves the latent, and the skip connections need it to divide evenly
        return 2 ** (len(config["down_block_types"]) - 1)

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        # keywords: SDXL's encode_prompt takes a second prompt in the second position
        embeds = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds[0]}

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return sampling_loop(pipe, pipe.unet, config)

    def text_towers(self, pipe: Any) -> list[TextTower]:
        return [TextTower(pipe.tokenizer, pipe.text_encoder)]

    serving_pipeline = "StableDiffusionPipeline"

    def served_text_encoders(self, pipe: Any) -> tuple[ServedTextEncoder, ...]:
        return (ServedTextEncoder("text_encoder", "tokenizer", (LAST_HIDDEN_STATE,)),)

    def serving_options(self, pipe: Any) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
