"""FLUX ControlNets: ``FluxControlNetPipeline`` around FLUX.1's ``FluxTransformer2DModel`` and a
``FluxControlNetModel``.

The transformer is the text-to-image one (64 features in and out); the ControlNet — a few FLUX blocks of its own —
reads the latent and the control image's packed latent and returns one sample per block of its own,
``controlnet_block_samples`` (double-stream) and ``controlnet_single_block_samples``, which the transformer adds to
its hidden states after its blocks (``FluxTransformer2DModel.forward``: sample ``i // interval`` after block ``i``, or
XLabs' ``i mod count`` when the pipeline passes ``controlnet_blocks_repeat``). Slimming narrows Linears inside the
transformer's blocks and keeps their hidden width, so a slim transformer takes the samples as the dense one does;
the ControlNet stays as it is.

As FLUX Kontext's, the transformer has FLUX.1-dev's configuration, so a bare transformer stays ``flux`` and the
family is registered for the pipeline class only; a slim folder slimmed in the pipeline records it in its plan.
Calibration runs ``FluxControlNetPipeline`` from seeded packed latents on the control images of ``--images`` (one per
prompt in turn; the pipeline resizes them and encodes them with the VAE, drawn by the prompt's generator); the
measuring runs condition on a colour ramp (or ``slimdiff eval --images``). ControlNet-Union models (a control mode
per image) and several ControlNets (``FluxMultiControlNetModel``: one control image each) are refused in one line for
calibration, ``slimdiff eval`` and ``slimdiff bench`` (:meth:`FluxControlNetFamily.check_sampling`): no flag says
which mode or which image of each kind a prompt takes.

Engines: ``slimdiff-export --controlnet-inputs`` builds transformer engines taking the ControlNet's samples too, as
many as it outputs (:class:`~slimdiff.families.flux.ControlNetSamples`, :meth:`FluxFamily.export_inputs`);
``--controlnet DIR`` the ControlNet's engine too (:func:`slimdiff.export.modules.controlnet_component`), but for Union
and XLabs ControlNets (:class:`FluxControlNet`). With ``--triton-repo`` a repository serves the pipeline as
SD's ControlNet pipelines are served (``serving_controlnet_pipeline``): the transformer engine taking the samples, the
ControlNet's engine, and the VAE encoder, since the pipeline encodes the request's control image.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline

from ..errors import SlimDiffError
from .base import CONTROLNETS, FAMILIES, ControlNetAdapter, ExportInput
from .flux import (
    PACK,
    ControlNetSamples,
    FluxFamily,
    default_guidance,
    float32_rotary,
    latent_ids,
    pack_latents,
    text_ids,
)
from .flux_control import CONTROL_IMAGE, ControlImageTask, control_loop
from .images import colour_ramp


def controlnet_loop(family: FluxFamily, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: ``FluxControlNetPipeline``'s own sampling of one batch — prompt ``i`` conditioned on
    ``images[seed mod count]`` — from seeded packed latents to latents."""
    family.check_sampling(pipe)
    return control_loop(family, pipe, config, "a FLUX ControlNet pipeline", "the ControlNet takes")


#: The exported input of a FLUX ControlNet engine carrying the control image's latent, unpacked.
CONTROL_LATENTS = "controlnet_cond"


@CONTROLNETS.register({FluxControlNetModel: "flux-controlnet"})
class FluxControlNet(ControlNetAdapter):
    """FLUX's ``FluxControlNetModel`` (InstantX's layout: the control image's packed latent beside the latent): the
    transformer call's exported inputs with :data:`CONTROL_LATENTS` (the control image's latent, unpacked) after the
    latent, both packed and positioned in the call as the transformer's exported call does; out: its block samples on
    the packed grid, under the names a transformer engine built with ``--controlnet-inputs`` takes them
    (:class:`~slimdiff.families.flux.ControlNetSamples`)."""

    def check_made_for(self, controlnet: Any, denoiser_config: Any, what: str) -> None:
        if "joint_attention_dim" not in denoiser_config:
            raise SlimDiffError(f"{what} is a FLUX ControlNet: export it with a FLUX model")
        config = controlnet.config
        keys = ("joint_attention_dim", "pooled_projection_dim", "in_channels")
        differ = [f"{k} {config.get(k)!r} vs the transformer's {denoiser_config.get(k)!r}" for k in keys
                  if config.get(k) != denoiser_config.get(k)]
        width, own = (c["num_attention_heads"] * c["attention_head_dim"] for c in (config, denoiser_config))
        if width != own:
            differ.insert(0, f"hidden width {width} vs the transformer's {own}")
        if differ:
            raise SlimDiffError(f"{what} was not made for this transformer: {'; '.join(differ[:2])}")

    def check_engine(self, controlnet: Any, what: str) -> None:
        # a Union model's control mode is one more input; XLabs' embeds the control image itself, at its size
        if controlnet.config.get("num_mode") is not None:
            raise SlimDiffError(f"{what} is a ControlNet-Union model (num_mode {controlnet.config['num_mode']}): its "
                                "engine is not built yet (it takes a control mode); keep it in PyTorch beside a "
                                "transformer engine built with --controlnet-inputs")
        if controlnet.config.get("conditioning_embedding_channels") is not None:
            raise SlimDiffError(f"{what} embeds the control image itself (XLabs' layout, "
                                "conditioning_embedding_channels): its engine is not built yet; keep it in PyTorch "
                                "beside a transformer engine built with --controlnet-inputs")

    def export_inputs(self, controlnet: Any) -> tuple[ExportInput, ...]:
        latent, *rest = self.family(controlnet).export_inputs(controlnet.config)  # the transformer's, no samples
        return (latent, ExportInput(CONTROL_LATENTS, latent.dims, latent.dtype), *rest)

    def export_outputs(self, controlnet: Any) -> tuple[str, ...]:
        return tuple(ControlNetSamples.of(controlnet).names)

    def export_call(self, controlnet: Any, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden_states, controlnet_cond, timestep, encoder_hidden_states, pooled_projections, *rest = inputs
        batch, _, height, width = hidden_states.shape
        with float32_rotary(controlnet):
            blocks, singles = controlnet(
                hidden_states=pack_latents(hidden_states), controlnet_cond=pack_latents(controlnet_cond),
                timestep=timestep, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                img_ids=latent_ids(height // PACK, width // PACK, device=hidden_states.device),
                txt_ids=text_ids(encoder_hidden_states),
                guidance=rest[0] if controlnet.config.get("guidance_embeds") else None,
                conditioning_scale=1.0, return_dict=False)
        return tuple(s.reshape(batch, height // PACK, width // PACK, s.shape[-1])
                     for s in (*(blocks or ()), *(singles or ())))


@FAMILIES.register({FluxControlNetPipeline: "flux-controlnet", FluxControlNetModel: "flux-controlnet"})
class FluxControlNetFamily(ControlImageTask, FluxFamily):
    """FLUX's call and blocks, the ControlNet's samples added after the blocks; sampling conditioned on a control
    image through the ControlNet. Registered for ``FluxControlNetModel`` too (as SD's family for ``ControlNetModel``):
    its engine is recorded as this family's."""

    def accepts(self, obj: Any) -> bool:
        return isinstance(obj, FluxControlNetModel) or super().accepts(obj)

    name = "flux-controlnet"
    # served only with the ControlNet's engine (slimdiff-export --controlnet DIR): the transformer's engine takes its
    # samples, which nothing in a repository makes without it
    serving_pipeline = None
    serving_controlnet_pipeline = "FluxControlNetPipeline"
    serving_img2img_pipeline = None
    serving_image_inputs = (CONTROL_IMAGE,)  # what calibration (--images) and eval (--images) condition on
    serving_encoded_images = (CONTROL_IMAGE,)  # the pipeline packs the VAE's latent of it for the ControlNet

    def check_sampling(self, pipe: Any) -> None:
        # several ControlNets take one control image each, a Union model a control mode per image: no flag says which
        controlnet = pipe.controlnet
        if type(controlnet).__name__ == "FluxMultiControlNetModel":
            raise SlimDiffError(f"{type(pipe).__name__} with {len(controlnet.nets)} ControlNets "
                                "(FluxMultiControlNetModel): calibrate, measure and time with one ControlNet (each "
                                "takes its own kind of control image)")
        if getattr(controlnet, "union", False):
            raise SlimDiffError(f"{type(pipe).__name__} with a ControlNet-Union model (num_mode "
                                f"{controlnet.config.num_mode}): slimdiff cannot say which control mode each image "
                                "is; calibrate, measure and time with a single-mode ControlNet")

    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        return controlnet_loop(self, pipe, config)

    def calling(self, pipe: Any) -> FluxFamily:
        self.check_sampling(pipe)  # what bench times: the ControlNet's samples on the measuring image
        return self.with_export_options([ControlNetSamples.of(pipe.controlnet).option])

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        # the timed calls' samples: the pipeline's ControlNet on the measuring runs' colour ramp, encoded and packed
        # as the pipeline does, at mid-schedule (sigma 0.5) on a seeded latent
        inputs = super().prompt_inputs(pipe, prompt, size, device)
        if self.controlnet_samples is None:
            return inputs
        height, width = size
        vae, controlnet = pipe.vae, pipe.controlnet
        image = pipe.prepare_image(colour_ramp(), width, height, 1, 1, vae.device, vae.dtype)
        latent = (vae.encode(image).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        packed = pack_latents(latent)
        rows, columns = latent.shape[-2] // PACK, latent.shape[-1] // PACK
        noise = torch.randn(packed.shape, generator=torch.Generator().manual_seed(0)).to(packed)
        call = {"controlnet_blocks_repeat": self.controlnet_samples.repeat}
        call["controlnet_block_samples"], call["controlnet_single_block_samples"] = controlnet(
            hidden_states=noise, controlnet_cond=packed, timestep=torch.full((1,), 0.5, device=vae.device),
            encoder_hidden_states=inputs["encoder_hidden_states"], pooled_projections=inputs["pooled_projections"],
            # the pipeline embeds its guidance scale in a guided ControlNet, also beside a transformer without
            guidance=default_guidance(pipe, vae.device) if controlnet.config.guidance_embeds else None,
            img_ids=latent_ids(rows, columns, device=vae.device), txt_ids=text_ids(inputs["encoder_hidden_states"]),
            return_dict=False)
        return {**inputs, **{name: s.to(device) for name, s in self.controlnet_samples.named(call, rows,
                                                                                            columns).items()}}

