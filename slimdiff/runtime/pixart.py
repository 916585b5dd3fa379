"""``EnginePixArtTransformer``: an engine-backed PixArt transformer that drops into a ``PixArtSigmaPipeline`` /
``PixArtAlphaPipeline`` as ``pipe.transformer`` (``slimdiff.use_engine(pipe, folder)``).

It takes the pipeline's call (``transformer(latents, encoder_hidden_states=…, encoder_attention_mask=…,
timestep=…, added_cond_kwargs=…, return_dict=False)``) and returns ``Transformer2DModelOutput`` or a tuple; the
T5 padding mask (1 keep, 0 padding, any dtype) is an engine input. Resolution and aspect-ratio conditions are
inputs only of engines exported from a transformer that uses them (PixArt-α 1024); the others ignore
``added_cond_kwargs`` entries that are None, as the PyTorch transformer does.

Not supported by engines (a clear error): ``attention_mask`` on the image tokens, ``cross_attention_kwargs``, and
an attention bias in place of the padding mask.
"""

from __future__ import annotations

import torch

from ..errors import SlimDiffError
from .denoiser import EngineDenoiser

#: Exported inputs before the additional conditions: hidden_states, timestep, encoder_hidden_states, mask.
_CALL_INPUTS = 4


class EnginePixArtTransformer(EngineDenoiser):
    component = "transformer"
    families = ("pixart",)

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None,
                return_dict: bool = True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        unsupported = [k for k, v in {"attention_mask": attention_mask,
                                      "cross_attention_kwargs": cross_attention_kwargs or None}.items()
                       if v is not None]
        if unsupported:
            raise SlimDiffError(f"engine transformers do not support {', '.join(unsupported)} (it needs the PyTorch "
                                "transformer)")
        if hidden_states.ndim != 4 or encoder_hidden_states is None or encoder_hidden_states.ndim != 3:
            raise SlimDiffError("expected hidden_states (B,C,H,W) and encoder_hidden_states (B,T,D), got "
                                f"{tuple(hidden_states.shape)} and "
                                f"{None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}")
        batch, channels, height, width = hidden_states.shape
        tokens = encoder_hidden_states.shape[1]
        if channels != self.in_channels or encoder_hidden_states.shape[0] != batch:
            raise SlimDiffError(f"hidden_states {tuple(hidden_states.shape)} / encoder_hidden_states "
                                f"{tuple(encoder_hidden_states.shape)} do not match this transformer "
                                f"({self.in_channels} channels, same batch)")
        if encoder_attention_mask is None:  # the PyTorch transformer attends to every token then
            encoder_attention_mask = torch.ones(batch, tokens)
        if tuple(encoder_attention_mask.shape) != (batch, tokens):
            raise SlimDiffError(f"encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)}; this engine "
                                f"takes a (batch, tokens) padding mask of 1 keep / 0 padding, ({batch}, {tokens})")
        self.check_shapes(batch, height, width, tokens)
        inputs = [hidden_states.to(self.device, self.dtype).contiguous(), self.timesteps(timestep, batch),
                  encoder_hidden_states.to(self.device, self.dtype).contiguous(),
                  encoder_attention_mask.to(self.device, self.dtype).contiguous(),
                  *self.conditions(added_cond_kwargs, _CALL_INPUTS, batch)]
        out = self.run(inputs, (batch, self.out_channels, height, width))
        out = out.to(device=hidden_states.device, dtype=hidden_states.dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def call_exported(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The pipeline's call on the exported inputs (``denoiser_component(...).random_inputs``), as
        ``slimdiff-export`` verifies an engine."""
        added = {spec["name"]: t for spec, t in zip(self.meta["inputs"][_CALL_INPUTS:], inputs[_CALL_INPUTS:])}
        return self(inputs[0], encoder_hidden_states=inputs[2], timestep=inputs[1], encoder_attention_mask=inputs[3],
                    added_cond_kwargs=added or {"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
