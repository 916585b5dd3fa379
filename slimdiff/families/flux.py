"""The FLUX family: ``FluxPipeline`` and its ``FluxTransformer2DModel`` (FLUX.1-dev, FLUX.1-schnell).

The denoiser is ``pipe.transformer``, called as ``transformer(hidden_states=…, encoder_hidden_states=…,
pooled_projections=…, timestep=…, img_ids=…, txt_ids=…, guidance=…)``. What calibration and export must know about
the call:

* ``hidden_states`` are packed latents: the VAE's 16-channel latent cut into 2×2 patches, (batch, h/2 · w/2, 64);
  ``img_ids`` (h/2 · w/2, 3) and ``txt_ids`` (text tokens, 3) are the tokens' positions, from which the transformer
  computes its rotary embeddings;
* ``timestep`` is the flow-matching sigma in [0, 1] (the pipeline divides the scheduler's timestep by 1000, the
  transformer multiplies it back): calibration indexes its statistics by sigma × 1000;
* ``guidance`` is the guidance scale, embedded with the timestep in guidance-distilled models (FLUX.1-dev:
  ``guidance_embeds``); None for FLUX.1-schnell. One transformer call per step: no classifier-free guidance batch
  (unless ``true_cfg_scale`` > 1 with a negative prompt, which calibration does not use);
* ``encoder_hidden_states`` are the T5 token states (``max_sequence_length`` 512 by default, nothing masked);
  ``pooled_projections`` CLIP-L's pooled output, which enters the adaLN conditioning, not the attention;
* the transformer projects the text tokens (``context_embedder``) and every block updates them: no attention reads
  the call's own text tensor.

The blocks' adapters live in :mod:`slimdiff.families.flux_blocks`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch import nn

from ..errors import SlimDiffError
from .base import FAMILIES, DenoiserFamily, TextTower
from .sd import guidance

#: The T5 prompt padded to the pipeline's default ``max_sequence_length``.
T5_TOKENS = 512
#: Latent pixels per side of one packed token: the pipeline packs 2×2 latent patches.
PACK = 2


def _transformer_of(obj: Any):
    return obj if isinstance(obj, FluxTransformer2DModel) else getattr(obj, "transformer", None)


def latent_ids(height: int, width: int, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """(height · width, 3) positions of packed latent tokens on a ``height`` × ``width`` grid, as the pipeline makes
    them (``FluxPipeline._prepare_latent_image_ids``): (0, row, column), row-major."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    columns = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, columns], 1).float()


@FAMILIES.register({FluxPipeline: "flux", FluxTransformer2DModel: "flux"})
class FluxFamily(DenoiserFamily):
    """``transformer(hidden_states, encoder_hidden_states=…, pooled_projections=…, timestep=…, img_ids=…,
    txt_ids=…, guidance=…)``; CLIP-L and T5 text towers; the pipeline's own flow-matching sampler."""

    name = "flux"
    text_tokens = T5_TOKENS
    component = "transformer"
    shares_text_context = False  # context_embedder (and every block) sits between the call's text and attention
    measures = False  # slimdiff bench and eval drive UNet calls so far

    def accepts(self, obj: Any) -> bool:
        return _transformer_of(obj) is not None

    def build(self, config: dict) -> nn.Module:
        return FluxTransformer2DModel.from_config(dict(config))

    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor:
        sigma = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        return torch.round(sigma * 1000)  # the scheduler's timestep, as the transformer's embedding sees it

    def text_context(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return None

    def dummy_call(self, config: Any, batch: int, latent: tuple[int, int], text_tokens: int | None = None, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        h, w = latent
        if h % PACK or w % PACK:
            raise SlimDiffError(f"a {h}×{w} latent does not pack into {PACK}×{PACK} patches: FLUX takes even latent "
                                "sizes")
        text_tokens = text_tokens or self.text_tokens
        tokens = (h // PACK) * (w // PACK)
        call = {"hidden_states": torch.zeros(batch, tokens, config["in_channels"], device=device, dtype=dtype),
                "encoder_hidden_states": torch.zeros(batch, text_tokens, config["joint_attention_dim"], device=device,
                                                     dtype=dtype),
                "pooled_projections": torch.zeros(batch, config["pooled_projection_dim"], device=device, dtype=dtype),
                "timestep": torch.zeros(batch, device=device, dtype=torch.float32),
                "img_ids": latent_ids(h // PACK, w // PACK, device=device),
                "txt_ids": torch.zeros(text_tokens, 3, device=device)}
        if config.get("guidance_embeds"):
            call["guidance"] = torch.zeros(batch, device=device, dtype=torch.float32)
        return call

    def default_text_len(self, pipe: Any) -> str:
        return str(self.text_tokens)

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        # the pipeline rounds an image size it cannot pack down with a warning: refused here, before any work
        multiple = pipe.vae_scale_factor * PACK
        for axis, size in (("height", config.height), ("width", config.width)):
            if size is not None and size % multiple:
                raise SlimDiffError(f"image {axis} {size} px: {type(pipe).__name__} takes multiples of {multiple} px "
                                    f"(VAE scale {pipe.vae_scale_factor} × {PACK}×{PACK} latent packing)")
        transformer = pipe.transformer
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = config.height or default, config.width or default
        tokens = (height // multiple) * (width // multiple)

        def run(prompts: Sequence[str], seeds: Sequence[int]) -> None:
            # one seeded draw per prompt, already packed (i.i.d. noise: packing only reorders it), so a prompt's
            # trajectory does not depend on batching or device
            latents = torch.cat([torch.randn((1, tokens, transformer.config.in_channels),
                                             generator=torch.Generator().manual_seed(int(s))) for s in seeds])
            pipe(list(prompts), num_inference_steps=config.steps, **guidance(config), height=height, width=width,
                 latents=latents.to(device=transformer.device, dtype=transformer.dtype), output_type="latent")

        return run

    def text_towers(self, pipe: Any) -> list[TextTower]:
        return [TextTower(pipe.tokenizer, pipe.text_encoder), TextTower(pipe.tokenizer_2, pipe.text_encoder_2)]
