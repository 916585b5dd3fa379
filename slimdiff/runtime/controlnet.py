"""``EngineControlNet``: a ControlNet engine (``slimdiff-export --controlnet DIR``) as ``pipe.controlnet`` of diffusers'
``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``.

It takes the call those pipelines make (``controlnet(latents, t, encoder_hidden_states=..., controlnet_cond=image,
conditioning_scale=..., guess_mode=..., added_cond_kwargs=..., return_dict=False)``) and returns the residuals as
the ControlNet does: the engine computes them at scale 1, and the conditioning scale — with guess mode, diffusers'
per-level scales from 0.1 to 1 — multiplies them here, as ``ControlNetModel.forward`` does after its network.

It is a ``ControlNetModel`` to Python (the pipelines branch on ``isinstance(controlnet, ControlNetModel)``) but holds
no network: nothing of ``ControlNetModel.__init__`` runs.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel

from ..errors import SlimDiffError
from ..export.modules import CONTROLNET, controlnet_scale
from ..families.sd import GUIDANCE_EMBEDDING
from .denoiser import EngineDenoiser


class EngineControlNet(EngineDenoiser, ControlNetModel):
    component = CONTROLNET
    families = ("sd", "sdxl")
    keyword_conditions = (GUIDANCE_EMBEDDING,)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale: float = 1.0,
                class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, guess_mode: bool = False, return_dict: bool = True):
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        unsupported = [name for name, value in (("class_labels", class_labels), ("attention_mask", attention_mask),
                                                ("cross_attention_kwargs", cross_attention_kwargs)) if value]
        if unsupported:
            raise SlimDiffError(f"engine ControlNets do not support {', '.join(unsupported)} (the PyTorch "
                                "ControlNet does)")
        batch, _, height, width = sample.shape
        self.check_shapes(batch, height, width, encoder_hidden_states.shape[1])
        scale = controlnet_scale(self.config)
        if tuple(controlnet_cond.shape[-2:]) != (height * scale, width * scale):
            raise SlimDiffError(f"controlnet_cond of {tuple(controlnet_cond.shape)} does not fit a latent of "
                                f"{height}x{width}: this ControlNet takes images {scale} times the latent's size")
        given = {**(added_cond_kwargs or {}), GUIDANCE_EMBEDDING: timestep_cond}
        folded = torch.nn.functional.pixel_unshuffle(controlnet_cond.to(self.device, self.dtype), scale)
        inputs = [*self.unet_call_inputs(sample, timestep, encoder_hidden_states, given, self.meta["inputs"][3:-1]),
                  folded.contiguous()]
        with self._lock:
            *down, mid = self.runner.run_outputs(inputs)
        # what ControlNetModel.forward does after its network
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1) * conditioning_scale
            down, mid = [d * s for d, s in zip(down, scales)], mid * scales[-1]
        else:
            down, mid = [d * conditioning_scale for d in down], mid * conditioning_scale
        down = [d.to(device=sample.device, dtype=sample.dtype) for d in down]
        mid = mid.to(device=sample.device, dtype=sample.dtype)
        if not return_dict:
            return tuple(down), mid
        return ControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid)

    @classmethod
    def exported_component(cls, module, meta: dict, family=None):
        from ..export.modules import controlnet_component

        return controlnet_component(module)

    def call_exported(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The engine's residuals for its exported inputs (``controlnet_component(...).random_inputs``), as
        ``slimdiff-export`` verifies an engine."""
        with self._lock:
            return self.runner.run_outputs(inputs)
