"""The PixArt family: ``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline`` and their ``PixArtTransformer2DModel``, the
first DiT on the adapter layer.

The denoiser is ``pipe.transformer``, called as ``transformer(hidden_states, encoder_hidden_states=…,
encoder_attention_mask=…, timestep=…, added_cond_kwargs=…)``. Its blocks are diffusers ``BasicTransformerBlock``s
with ``norm_type="ada_norm_single"`` and a plain GELU feed-forward, so the block adapter of SD and SDXL serves them
(see :mod:`slimdiff.families.blocks` for what ada_norm_single changes in where calibration looks). Two things differ
from a UNet that calibration must know:

* the T5 text tokens are padded to the pipeline's ``max_sequence_length`` and the padding is masked out of every
  cross-attention (``encoder_attention_mask``): the context statistics count only the tokens attended to;
* the transformer projects the T5 states (``caption_projection``) before its blocks, so no cross-attention reads
  the call's own text tensor: each keeps the moment of its context itself.

PixArt-α at 1024² adds resolution and aspect-ratio conditioning (``use_additional_conditions``); PixArt-Σ does not.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from torch import nn

from .base import FAMILIES, MODEL_DTYPE, ConditionInput, DenoiserFamily, TextTower
from .sd import guidance

def _transformer_of(obj: Any):
    return obj if isinstance(obj, PixArtTransformer2DModel) else getattr(obj, "transformer", None)


@FAMILIES.register({PixArtSigmaPipeline: "pixart", PixArtAlphaPipeline: "pixart", PixArtTransformer2DModel: "pixart"})
class PixArtFamily(DenoiserFamily):
    """``transformer(hidden_states, timestep=…, encoder_hidden_states=…, encoder_attention_mask=…)``; one T5 text
    tower; the pipeline's own sampler."""

    name = "pixart"
    text_tokens = 300  # PixArt-Σ's pipeline default max_sequence_length (PixArt-α: 120)
    shares_text_context = False  # caption_projection sits between the call's text and the cross-attentions
    engines = False  # export and engines drive UNet calls so far

    def accepts(self, obj: Any) -> bool:
        return _transformer_of(obj) is not None

    def denoiser(self, pipe: Any) -> nn.Module:
        return pipe.transformer

    def build(self, config: dict) -> nn.Module:
        return PixArtTransformer2DModel.from_config(dict(config))

    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return kwargs.get("timestep", args[2] if len(args) > 2 else None)

    def text_context(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return None

    def condition_inputs(self, config: Any) -> tuple[ConditionInput, ...]:
        if not _additional_conditions(config):
            return ()
        return (ConditionInput("resolution", ("batch", 2), MODEL_DTYPE, high=1024.0),
                ConditionInput("aspect_ratio", ("batch", 1), MODEL_DTYPE, high=2.0))

    def dummy_call(self, config: Any, batch: int, latent: tuple[int, int], text_tokens: int | None = None, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        h, w = latent
        text_tokens = text_tokens or self.text_tokens
        extra = {c.name: torch.zeros(tuple(batch if d == "batch" else d for d in c.dims), device=device, dtype=dtype)
                 for c in self.condition_inputs(config)}
        return {"hidden_states": torch.zeros(batch, config["in_channels"], h, w, device=device, dtype=dtype),
                "timestep": torch.zeros(batch, device=device, dtype=torch.long),
                "encoder_hidden_states": torch.zeros(batch, text_tokens, config["caption_channels"], device=device,
                                                     dtype=dtype),
                "encoder_attention_mask": torch.ones(batch, text_tokens, device=device, dtype=dtype),
                "added_cond_kwargs": extra or {"resolution": None, "aspect_ratio": None}}

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        def run(prompts: Sequence[str], seeds: Sequence[int]) -> None:
            transformer = pipe.transformer
            device = transformer.device
            scale = pipe.vae_scale_factor
            h = (config.height or transformer.config.sample_size * scale) // scale
            w = (config.width or transformer.config.sample_size * scale) // scale
            gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
            # Latents drawn on the CPU per prompt, as in the SD loop: a prompt's trajectory does not depend on
            # batching or device.
            latents = torch.cat([torch.randn((1, transformer.config.in_channels, h, w), generator=g) for g in gens])
            pipe(list(prompts), num_inference_steps=config.steps, **guidance(config),
                 latents=latents.to(device=device, dtype=transformer.dtype), output_type="latent",
                 height=h * scale, width=w * scale, use_resolution_binning=False, clean_caption=False)

        return run

    def text_towers(self, pipe: Any) -> list[TextTower]:
        return [TextTower(pipe.tokenizer, pipe.text_encoder)]


def _additional_conditions(config: Any) -> bool:
    """Whether the transformer embeds resolution and aspect ratio (PixArt-α 1024: diffusers' default for a
    ``sample_size`` of 128 when the config does not say)."""
    flag = config.get("use_additional_conditions")
    return config.get("sample_size") == 128 if flag is None else bool(flag)
