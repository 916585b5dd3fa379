"""The Stable Diffusion 3 family: ``StableDiffusion3Pipeline`` and its ``SD3Transformer2DModel`` (MMDiT).

The denoiser is ``pipe.transformer``, called as ``transformer(hidden_states=…, timestep=…,
encoder_hidden_states=…, pooled_projections=…)``. What calibration and export must know about the call:

* ``timestep`` is a float, the flow-matching sigma times 1000 (``FlowMatchEulerDiscreteScheduler``): calibration
  indexes its statistics by its integer part;
* ``encoder_hidden_states`` is the side-by-side CLIP-L / CLIP-G penultimate token states zero-padded to the T5
  width, followed by the T5 tokens (77 + ``max_sequence_length`` 256 = 333 tokens; zeros in place of the T5 tokens
  when the pipeline has no ``text_encoder_3``). Nothing is masked: every token is attended to;
* ``pooled_projections`` is the two CLIPs' pooled projections side by side; it enters the adaLN conditioning with
  the timestep, not the attention;
* the transformer projects the text tokens (``context_embedder``) before its blocks, and each joint block updates
  them: no attention reads the call's own text tensor.

The blocks are diffusers ``JointTransformerBlock``s; their adapter lives in :mod:`slimdiff.families.mmdit`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import nn

from .base import (
    FAMILIES,
    LAST_HIDDEN_STATE,
    MODEL_DTYPE,
    PENULTIMATE_HIDDEN_STATE,
    TEXT_EMBEDS,
    TIMESTEP,
    DenoiserFamily,
    ExportInput,
    ServedTextEncoder,
    TextTower,
    pipeline_call_default,
)
from .sd import sampling_loop

#: CLIP's 77 tokens, then the T5 prompt padded to the pipeline's default ``max_sequence_length``.
CLIP_TOKENS, T5_TOKENS = 77, 256


def _transformer_of(obj: Any):
    return obj if isinstance(obj, SD3Transformer2DModel) else getattr(obj, "transformer", None)


@FAMILIES.register({StableDiffusion3Pipeline: "sd3", SD3Transformer2DModel: "sd3"})
class SD3Family(DenoiserFamily):
    """``transformer(hidden_states, timestep=…, encoder_hidden_states=…, pooled_projections=…)``; CLIP-L, CLIP-G
    and T5 text towers; the pipeline's own flow-matching sampler."""

    name = "sd3"
    text_tokens = CLIP_TOKENS + T5_TOKENS
    component = "transformer"
    shares_text_context = False  # context_embedder (and every joint block) sits between the call's text and attention

    def accepts(self, obj: Any) -> bool:
        return _transformer_of(obj) is not None

    def build(self, config: dict) -> nn.Module:
        return SD3Transformer2DModel.from_config(dict(config))

    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return kwargs.get("timestep", args[3] if len(args) > 3 else None)

    def text_context(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return None

    def dummy_call(self, config: Any, batch: int, latent: tuple[int, int], text_tokens: int | None = None, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        h, w = latent
        text_tokens = text_tokens or self.text_tokens
        return {"hidden_states": torch.zeros(batch, config["in_channels"], h, w, device=device, dtype=dtype),
                "timestep": torch.zeros(batch, device=device, dtype=torch.float32),
                "encoder_hidden_states": torch.zeros(batch, text_tokens, config["joint_attention_dim"], device=device,
                                                     dtype=dtype),
                "pooled_projections": torch.zeros(batch, config["pooled_projection_dim"], device=device, dtype=dtype)}

    # The patch embedding crops its position table around the centre for the latent size (``cropped_pos_embed``):
    # a slice whose bounds follow the size, which an exported graph keeps symbolic, so one engine serves a range
    # of image sizes up to ``pos_embed_max_size`` patches.
    static_axes = ()

    def export_inputs(self, config: Any) -> tuple[ExportInput, ...]:
        return (
            ExportInput("hidden_states", ("batch", config["in_channels"], "height", "width"), MODEL_DTYPE),
            ExportInput("timestep", ("batch",), "float32", draw=TIMESTEP),  # float32 as the UNets'
            ExportInput("encoder_hidden_states", ("batch", "text_len", config["joint_attention_dim"]), MODEL_DTYPE),
            ExportInput("pooled_projections", ("batch", config["pooled_projection_dim"]), MODEL_DTYPE),
        )

    def export_call(self, transformer: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor) -> torch.Tensor:
        return transformer(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                           pooled_projections=pooled_projections, return_dict=False)[0]

    def export_limits(self, config: Any) -> dict[str, tuple[int, str]]:
        # PatchEmbed crops a stored position table of pos_embed_max_size patches a side: PyTorch refuses a larger
        # latent, and an exported graph would slice outside the table
        patches = config.get("pos_embed_max_size")
        if not patches:
            return {}
        latent = patches * int(config.get("patch_size") or 1)
        why = f"its position table covers {patches} patches of {config.get('patch_size')} a side"
        return {"height": (latent, why), "width": (latent, why)}

    def default_text_len(self, pipe: Any) -> str:
        # CLIP's 77 tokens and the T5 prompt padded to max_sequence_length: one length
        return str(self.text_tokens)

    def latent_multiple(self, config: Any) -> int:
        return int(config["patch_size"])

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return sampling_loop(pipe, pipe.transformer, config)

    def text_towers(self, pipe: Any) -> list[TextTower]:
        towers = [TextTower(pipe.tokenizer, pipe.text_encoder), TextTower(pipe.tokenizer_2, pipe.text_encoder_2)]
        if pipe.text_encoder_3 is not None:  # without T5 the pipeline conditions on zeros in its place
            towers.append(TextTower(pipe.tokenizer_3, pipe.text_encoder_3))
        return towers

    serving_pipeline = "StableDiffusion3Pipeline"
    serving_img2img_pipeline = "StableDiffusion3Img2ImgPipeline"

    def served_text_encoders(self, pipe: Any) -> tuple[ServedTextEncoder, ...]:
        # Each CLIP: hidden_states[-2] (the prompt embedding's first 77 tokens, side by side) and [0], the projected
        # pooled text_embeds (pooled_projections, side by side), over tokenizer_max_length tokens. The T5: [0], the
        # last hidden state, over max_sequence_length tokens; no attention mask.
        clip = (PENULTIMATE_HIDDEN_STATE, TEXT_EMBEDS)
        towers = (ServedTextEncoder("text_encoder", "tokenizer", clip, tokens=pipe.tokenizer_max_length),
                  ServedTextEncoder("text_encoder_2", "tokenizer_2", clip, tokens=pipe.tokenizer_max_length))
        if pipe.text_encoder_3 is None:  # the pipeline conditions on zeros in the T5's place
            return towers
        return (*towers, ServedTextEncoder("text_encoder_3", "tokenizer_3", (LAST_HIDDEN_STATE,),
                                           tokens=int(pipeline_call_default(pipe, "max_sequence_length"))))

    def serving_options(self, pipe: Any) -> dict:
        # the constructor takes the T5 and its tokenizer as required arguments, None where the pipeline has none
        return {"text_encoder_3": None, "tokenizer_3": None} if pipe.text_encoder_3 is None else {}
