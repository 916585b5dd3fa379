"""``EngineControlNet``: a ControlNet engine (``slimdiff-export --controlnet DIR``) as ``pipe.controlnet`` of diffusers'
``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``.

It takes the call those pipelines make (``controlnet(latents, t, encoder_hidden_states=..., controlnet_cond=image,
conditioning_scale=..., guess_mode=..., added_cond_kwargs=..., return_dict=False)``) and returns the residuals as
the ControlNet does: the engine computes them at scale 1, and the conditioning scale — with guess mode, diffusers'
per-level scales from 0.1 to 1 — multiplies them here, as ``ControlNetModel.forward`` does after its network.

It is a ``ControlNetModel`` to Python (the pipelines branch on ``isinstance(controlnet, ControlNetModel)``) but holds
no network: nothing of ``ControlNetModel.__init__`` runs.

``EngineFluxControlNet`` does the same for a FLUX ControlNet engine in ``FluxControlNetPipeline`` (a
``FluxControlNetModel`` to it): it takes the pipeline's packed call, unpacks the latent and the control image's
latent onto the grid its positions say, and returns the block samples as token sequences, the conditioning scale
applied after the network as ``FluxControlNetModel.forward`` applies it.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, FluxControlNetModel

from ..errors import SlimDiffError
from ..export.modules import CONTROLNET
from ..families.flux import PACK, ControlNetSamples, latent_ids, pack_latents, packed_grids, unpack_latents
from ..families.flux_controlnet import CONTROL_LATENTS
from ..families.sd import GUIDANCE_EMBEDDING, controlnet_scale
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


class EngineFluxControlNet(EngineDenoiser, FluxControlNetModel):
    component = CONTROLNET
    families = ("flux-controlnet",)
    #: What FluxControlNetPipeline reads to tell XLabs' ControlNets (which embed the control image themselves, and are
    #: not built as engines) from InstantX's, whose control image it encodes and packs.
    input_hint_block = None

    @property
    def samples(self) -> ControlNetSamples:
        return ControlNetSamples.of(self)

    def forward(self, hidden_states, controlnet_cond, controlnet_mode=None, conditioning_scale: float = 1.0,
                encoder_hidden_states=None, pooled_projections=None, timestep=None, img_ids=None, txt_ids=None,
                guidance=None, joint_attention_kwargs=None, return_dict: bool = True):
        from diffusers.models.controlnets.controlnet_flux import FluxControlNetOutput

        unsupported = [name for name, value in (("controlnet_mode", controlnet_mode),
                                                ("joint_attention_kwargs", joint_attention_kwargs or None))
                       if value is not None]
        if unsupported:
            raise SlimDiffError(f"engine FLUX ControlNets do not support {', '.join(unsupported)} (Union modes, "
                                "IP-Adapter and LoRA scales need the PyTorch ControlNet)")
        if (hidden_states.ndim != 3 or controlnet_cond is None
                or tuple(controlnet_cond.shape) != tuple(hidden_states.shape)
                or any(t is None for t in (encoder_hidden_states, pooled_projections, img_ids, txt_ids))):
            raise SlimDiffError("expected FluxControlNetPipeline's call: packed hidden_states (B,N,C), a packed "
                                "controlnet_cond of the same shape, encoder_hidden_states, pooled_projections, img_ids "
                                "and txt_ids")
        batch, tokens, features = hidden_states.shape
        self.check_pooled_call(hidden_states, features, "packed features", encoder_hidden_states, pooled_projections)
        ((rows, columns),) = packed_grids(img_ids, txt_ids, tokens, encoder_hidden_states.shape[1])
        height, width = rows * PACK, columns * PACK
        self.check_shapes(batch, height, width, encoder_hidden_states.shape[1])
        inputs = [*(unpack_latents(t, height, width).to(self.device, self.dtype).contiguous()
                    for t in (hidden_states, controlnet_cond)),
                  self.timesteps(timestep, batch), encoder_hidden_states.to(self.device, self.dtype).contiguous(),
                  pooled_projections.to(self.device, self.dtype).contiguous()]
        if self.config.get("guidance_embeds"):
            if guidance is None:
                raise SlimDiffError("this ControlNet engine embeds a guidance scale (guidance_embeds): pass guidance")
            inputs.append(self.timesteps(guidance, batch))
        with self._lock:
            outputs = self.runner.run_outputs(inputs)
        # what FluxControlNetModel.forward does after its network: the scale, and the samples as token sequences
        samples = [(o.reshape(batch, tokens, o.shape[-1]) * conditioning_scale).to(device=hidden_states.device,
                                                                                  dtype=hidden_states.dtype)
                   for o in outputs]
        double = self.samples.double
        blocks, singles = samples[:double] or None, samples[double:] or None
        if not return_dict:
            return blocks, singles
        return FluxControlNetOutput(controlnet_block_samples=blocks, controlnet_single_block_samples=singles)

    @classmethod
    def exported_component(cls, module, meta: dict, family=None):
        from ..export.modules import controlnet_component

        return controlnet_component(module)

    def call_exported(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pipeline's call on the exported inputs (``controlnet_component(...).random_inputs``), its samples on the
        packed grid, as ``slimdiff-export`` verifies an engine."""
        named = dict(zip((i["name"] for i in self.meta["inputs"]), inputs))
        latents, text = named["hidden_states"], named["encoder_hidden_states"]
        batch, _, height, width = latents.shape
        blocks, singles = self(hidden_states=pack_latents(latents),
                               controlnet_cond=pack_latents(named[CONTROL_LATENTS]),
                               timestep=named["timestep"], encoder_hidden_states=text,
                               pooled_projections=named["pooled_projections"],
                               img_ids=latent_ids(height // PACK, width // PACK), txt_ids=torch.zeros(text.shape[1], 3),
                               guidance=named.get("guidance"), return_dict=False)
        return [s.reshape(batch, height // PACK, width // PACK, s.shape[-1])
                for s in (*(blocks or ()), *(singles or ()))]
