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

from .base import (
    FAMILIES,
    KEEP_MASK,
    LAST_HIDDEN_STATE,
    MODEL_DTYPE,
    TIMESTEP,
    ConditionInput,
    DenoiserFamily,
    ExportInput,
    ServedTextEncoder,
    TextTower,
    pipeline_call_default,
)
from .sd import sampling_loop

#: PixArt-α's pipeline pads its prompts to this many tokens (PixArt-Σ's: :attr:`PixArtFamily.text_tokens`).
ALPHA_TEXT_TOKENS = 120


def _transformer_of(obj: Any):
    return obj if isinstance(obj, PixArtTransformer2DModel) else getattr(obj, "transformer", None)


@FAMILIES.register({PixArtSigmaPipeline: "pixart", PixArtAlphaPipeline: "pixart", PixArtTransformer2DModel: "pixart"})
class PixArtFamily(DenoiserFamily):
    """``transformer(hidden_states, timestep=…, encoder_hidden_states=…, encoder_attention_mask=…)``; one T5 text
    tower; the pipeline's own sampler."""

    name = "pixart"
    text_tokens = 300  # PixArt-Σ's pipeline default max_sequence_length (PixArt-α: 120)
    shares_text_context = False  # caption_projection sits between the call's text and the cross-attentions
    # exact sizes (the tiny built-in's latent lies outside PixArt's aspect-ratio bins); no caption cleaning (it
    # needs packages the pipeline only warns about)
    pipeline_options = {"use_resolution_binning": False, "clean_caption": False}

    def accepts(self, obj: Any) -> bool:
        return _transformer_of(obj) is not None

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
        extra = self.condition_zeros(config, batch, device, dtype)
        return {"hidden_states": torch.zeros(batch, config["in_channels"], h, w, device=device, dtype=dtype),
                "timestep": torch.zeros(batch, device=device, dtype=torch.long),
                "encoder_hidden_states": torch.zeros(batch, text_tokens, config["caption_channels"], device=device,
                                                     dtype=dtype),
                "encoder_attention_mask": torch.ones(batch, text_tokens, device=device, dtype=dtype),
                "added_cond_kwargs": extra or {"resolution": None, "aspect_ratio": None}}

    # The transformer adds a sinusoidal position embedding of the patch grid, which diffusers takes from a buffer at
    # the configured size and computes otherwise: a branch on the latent size that an exported graph cannot keep
    # open. Each engine serves one image size.
    static_axes = ("height", "width")
    component = "transformer"

    def export_inputs(self, config: Any) -> tuple[ExportInput, ...]:
        return (
            ExportInput("hidden_states", ("batch", config["in_channels"], "height", "width"), MODEL_DTYPE),
            ExportInput("timestep", ("batch",), "float32", draw=TIMESTEP),  # float32 as the UNets'
            ExportInput("encoder_hidden_states", ("batch", "text_len", config["caption_channels"]), MODEL_DTYPE),
            # 1 keep, 0 T5 padding (the pipeline's prompt attention mask), in the model's precision
            ExportInput("encoder_attention_mask", ("batch", "text_len"), MODEL_DTYPE, draw=KEEP_MASK),
            *(ExportInput(c.name, c.dims, c.dtype, high=c.high) for c in self.condition_inputs(config)),
        )

    def export_call(self, transformer: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                    *conditions: torch.Tensor) -> torch.Tensor:
        # The padding mask as the additive bias the transformer makes of it, spelled out for every image token:
        # ONNX Runtime's fused Attention kernel refuses a mask that leaves the query axis to broadcasting.
        batch, _, height, width = hidden_states.shape
        patch = transformer.config.patch_size
        bias = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
        bias = bias[:, None, :].expand(batch, (height // patch) * (width // patch), -1)
        added = {c.name: t for c, t in zip(self.condition_inputs(transformer.config), conditions)}
        return transformer(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                           encoder_attention_mask=bias, added_cond_kwargs=added or {"resolution": None,
                                                                                     "aspect_ratio": None},
                           return_dict=False)[0]

    def default_text_len(self, pipe: Any) -> str:
        # T5 prompts are padded to the pipeline's max_sequence_length: one length
        return str(ALPHA_TEXT_TOKENS if isinstance(pipe, PixArtAlphaPipeline) else self.text_tokens)

    def latent_multiple(self, config: Any) -> int:
        return int(config["patch_size"])

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                                device=device, clean_caption=False)
        inputs = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if _additional_conditions(pipe.transformer.config):  # as the pipeline computes them for PixArt-α 1024
            h, w = size
            inputs.update(resolution=torch.tensor([[h, w]], dtype=torch.float32, device=device),
                          aspect_ratio=torch.tensor([[h / w]], dtype=torch.float32, device=device))
        return inputs

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return sampling_loop(pipe, pipe.transformer, config, **self.pipeline_options)

    def text_towers(self, pipe: Any) -> list[TextTower]:
        return [TextTower(pipe.tokenizer, pipe.text_encoder)]

    # PixArt-α's pipeline is a class of its own (120 tokens, aspect-ratio conditions at 1024): not served yet
    serving_pipeline = "PixArtSigmaPipeline"

    def served_text_encoders(self, pipe: Any) -> tuple[ServedTextEncoder, ...]:
        # encode_prompt pads the prompt to max_sequence_length and passes the tokenizer's attention mask to the T5;
        # it reads the last hidden state ([0]) and hands the same mask on to the transformer
        return (ServedTextEncoder("text_encoder", "tokenizer", (LAST_HIDDEN_STATE,), attention_mask=True,
                                  tokens=int(pipeline_call_default(pipe, "max_sequence_length"))),)


def _additional_conditions(config: Any) -> bool:
    """Whether the transformer embeds resolution and aspect ratio (PixArt-α 1024: diffusers' default for a
    ``sample_size`` of 128 when the config does not say)."""
    flag = config.get("use_additional_conditions")
    return config.get("sample_size") == 128 if flag is None else bool(flag)
