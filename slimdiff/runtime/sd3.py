"""``EngineSD3Transformer``: an engine-backed SD3 transformer that drops into a ``StableDiffusion3Pipeline`` as
``pipe.transformer`` (``slimdiff.use_engine(pipe, folder)``).

It takes the pipeline's call (``transformer(hidden_states=…, timestep=…, encoder_hidden_states=…,
pooled_projections=…, joint_attention_kwargs=…, return_dict=False)``) and returns ``Transformer2DModelOutput`` or a
tuple. The engine's inputs are those four tensors; the timestep is the flow-matching float (sigma · 1000).

Not supported by engines (a clear error): ControlNet residuals (``block_controlnet_hidden_states``),
``joint_attention_kwargs`` (IP-Adapter embeddings, LoRA scales) and ``skip_layers`` (skip-layer guidance).
"""

from __future__ import annotations

from ..errors import SlimDiffError
from .denoiser import EngineDenoiser


class EngineSD3Transformer(EngineDenoiser):
    component = "transformer"
    families = ("sd3",)

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict: bool = True,
                skip_layers=None):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        unsupported = [k for k, v in {"block_controlnet_hidden_states": block_controlnet_hidden_states,
                                      "joint_attention_kwargs": joint_attention_kwargs or None,
                                      "skip_layers": skip_layers}.items() if v is not None]
        if unsupported:
            raise SlimDiffError(f"engine transformers do not support {', '.join(unsupported)} (ControlNet, IP-Adapter, "
                                "LoRA scales and skip-layer guidance need the PyTorch transformer)")
        if (hidden_states.ndim != 4 or encoder_hidden_states is None or encoder_hidden_states.ndim != 3
                or pooled_projections is None or pooled_projections.ndim != 2):
            shapes = [None if t is None else tuple(t.shape)
                      for t in (hidden_states, encoder_hidden_states, pooled_projections)]
            raise SlimDiffError("expected hidden_states (B,C,H,W), encoder_hidden_states (B,T,D) and "
                                f"pooled_projections (B,P), got {', '.join(map(str, shapes))}")
        batch, channels, height, width = hidden_states.shape
        self.check_pooled_call(hidden_states, channels, "channels", encoder_hidden_states, pooled_projections)
        self.check_shapes(batch, height, width, encoder_hidden_states.shape[1])
        inputs = [hidden_states.to(self.device, self.dtype).contiguous(), self.timesteps(timestep, batch),
                  encoder_hidden_states.to(self.device, self.dtype).contiguous(),
                  pooled_projections.to(self.device, self.dtype).contiguous()]
        out = self.run(inputs, (batch, self.out_channels, height, width))
        out = out.to(device=hidden_states.device, dtype=hidden_states.dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def call_exported(self, inputs):
        """The pipeline's call on the exported inputs (``denoiser_component(...).random_inputs``), as
        ``slimdiff-export`` verifies an engine."""
        return self(hidden_states=inputs[0], timestep=inputs[1], encoder_hidden_states=inputs[2],
                    pooled_projections=inputs[3], return_dict=False)[0]
