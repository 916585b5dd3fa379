"""``EngineFluxTransformer``: an engine-backed FLUX transformer that drops into a ``FluxPipeline`` (or FLUX Fill's
``FluxFillPipeline``, FLUX Control's ``FluxControlPipeline``, FLUX Kontext's ``FluxKontextPipeline``) as
``pipe.transformer`` (``slimdiff.use_engine(pipe, folder)``).

It takes the pipeline's call (``transformer(hidden_states=…, timestep=…, guidance=…, pooled_projections=…,
encoder_hidden_states=…, txt_ids=…, img_ids=…, joint_attention_kwargs=…, return_dict=False)``) on packed latents and
returns them packed, as ``Transformer2DModelOutput`` or a tuple (Fill's and Control's tokens carry their image
conditioning beside the latent: packed in, the latent's features out). The engine takes the latent unpacked and builds the
positions itself (:meth:`slimdiff.families.flux.FluxFamily.export_call`): the call's ``img_ids`` must be those of a
row-major grid of packed tokens and its ``txt_ids`` zeros, as the text-to-image pipeline makes them; the latent's
size is read off ``img_ids``. A FLUX Kontext engine (exported from a ``FluxKontextPipeline``) takes the reference
image's latent too: the call's tokens are split where ``img_ids`` turn from the latent's grid to the reference's
(first coordinate 1), and it returns the latent's tokens alone — all the pipeline keeps. The timestep is the
flow-matching sigma in [0, 1]; ``guidance`` the embedded guidance scale of a guidance-distilled model (FLUX.1-dev),
none for FLUX.1-schnell.

An engine built with a ControlNet's sample inputs (``slimdiff-export --controlnet-inputs`` on a
``FluxControlNetPipeline``: :class:`~slimdiff.families.flux.ControlNetSamples`) takes the
``controlnet_block_samples`` and ``controlnet_single_block_samples`` ``FluxControlNetPipeline`` passes (the packed
tokens viewed as the latent's packed grid); called without them (a pipeline without ControlNet) it gets zeros, which
the transformer adds to nothing.

Not supported by engines (a clear error): other positions (a reference image's tokens given to an engine exported
without one, or none given to a Kontext engine, …), ControlNet samples given to an engine built without them or of
another ControlNet's layout, and ``joint_attention_kwargs`` (IP-Adapter embeddings, LoRA scales).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import SlimDiffError
from ..families.flux import (
    PACK,
    ControlNetSamples,
    latent_features,
    latent_ids,
    pack_latents,
    packed_grids,
    unpack_latents,
)
from ..families.flux_kontext import REFERENCE_LATENTS
from .denoiser import EngineDenoiser


class EngineFluxTransformer(EngineDenoiser):
    component = "transformer"
    families = ("flux", "flux-fill", "flux-control", "flux-kontext", "flux-controlnet")

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.meta["inputs"]]

    @property
    def out_channels(self) -> int:
        return latent_features(self._config)

    @property
    def controlnet_samples(self) -> ControlNetSamples | None:
        """The layout of the ControlNet samples the engine takes (``slimdiff-export --controlnet-inputs``), or None."""
        layouts = [ControlNetSamples.parse(option) for option in self.meta.get("export_options", ())]
        return next((layout for layout in layouts if layout is not None), None)

    def cache_context(self, name: str):
        """What ``FluxPipeline`` wraps each call in (diffusers' cache hooks): engines cache nothing between calls."""
        return contextlib.nullcontext()

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                controlnet_single_block_samples=None, return_dict: bool = True, controlnet_blocks_repeat: bool = False):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if joint_attention_kwargs:
            raise SlimDiffError("engine transformers do not support joint_attention_kwargs (IP-Adapter and LoRA scales "
                                "need the PyTorch transformer)")
        if (hidden_states.ndim != 3 or encoder_hidden_states is None or encoder_hidden_states.ndim != 3
                or pooled_projections is None or pooled_projections.ndim != 2 or img_ids is None or txt_ids is None):
            shapes = [None if t is None else tuple(t.shape)
                      for t in (hidden_states, encoder_hidden_states, pooled_projections, img_ids, txt_ids)]
            raise SlimDiffError("expected packed hidden_states (B,N,C), encoder_hidden_states (B,T,D), "
                                "pooled_projections (B,P), img_ids (N,3) and txt_ids (T,3), got "
                                + ", ".join(map(str, shapes)))
        batch, tokens, features = hidden_states.shape
        self.check_pooled_call(hidden_states, features, "packed features", encoder_hidden_states, pooled_projections)
        reference = REFERENCE_LATENTS in self.input_names
        grids = packed_grids(img_ids, txt_ids, tokens, encoder_hidden_states.shape[1], reference=reference)
        (height, width), *reference_size = [(rows * PACK, columns * PACK) for rows, columns in grids]
        self.check_shapes(batch, height, width, encoder_hidden_states.shape[1], *reference_size)
        latent = (height // PACK) * (width // PACK)
        unpacked = [unpack_latents(hidden_states[:, :latent], height, width)]
        if reference:  # the reference image's tokens follow the latent's
            unpacked.append(unpack_latents(hidden_states[:, latent:], *reference_size[0]))
        inputs = [*(t.to(self.device, self.dtype).contiguous() for t in unpacked), self.timesteps(timestep, batch),
                  encoder_hidden_states.to(self.device, self.dtype).contiguous(),
                  pooled_projections.to(self.device, self.dtype).contiguous()]
        if "guidance" in self.input_names:
            if guidance is None:
                raise SlimDiffError("this engine embeds a guidance scale (FLUX.1-dev's guidance_embeds): pass guidance")
            inputs.append(self.timesteps(guidance, batch))
        elif guidance is not None:
            raise SlimDiffError("this engine's transformer has no guidance embedding (FLUX.1-schnell): it takes no "
                                "guidance")
        inputs += self._samples(controlnet_block_samples, controlnet_single_block_samples, controlnet_blocks_repeat,
                                (batch, height // PACK, width // PACK))
        out = self.run(inputs, (batch, self.out_channels // PACK**2, height, width))
        out = pack_latents(out).to(device=hidden_states.device, dtype=hidden_states.dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _samples(self, block_samples, single_block_samples, repeat: bool, grid: tuple[int, int, int]
                 ) -> list[torch.Tensor]:
        """The ControlNet sample inputs of the call: the samples given, checked against the engine's layout and viewed
        on the packed ``grid`` = (batch, rows, columns), or zeros (no ControlNet: the transformer adds nothing)."""
        layout, given = self.controlnet_samples, [*(block_samples or ()), *(single_block_samples or ())]
        passed = block_samples is not None or single_block_samples is not None
        if layout is None:
            if passed:
                raise SlimDiffError(f"this transformer engine ({self.folder}) was built without ControlNet sample "
                                    "inputs, so it cannot take controlnet_block_samples: rebuild it with "
                                    "slimdiff-export --controlnet-inputs from the FluxControlNetPipeline, or keep the "
                                    "PyTorch transformer")
            return []
        width = self._config["num_attention_heads"] * self._config["attention_head_dim"]
        if not passed:
            return [torch.zeros((*grid, width), device=self.device, dtype=self.dtype) for _ in layout.names]
        got = ControlNetSamples(len(block_samples or ()), len(single_block_samples or ()), bool(repeat))
        if got != layout:
            raise SlimDiffError(f"got ControlNet samples {got.describe()}; this engine takes {layout.describe()} (the "
                                "ControlNet it was exported for): rebuild it for this ControlNet")
        batch, rows, columns = grid
        expected = (batch, rows * columns, width)
        wrong = [tuple(s.shape) for s in given if tuple(s.shape) != expected]
        if wrong:
            raise SlimDiffError(f"ControlNet samples of shape {wrong[0]} do not fit this transformer's call: it takes "
                                f"{expected} (batch, packed tokens, hidden width)")
        return [s.reshape(*grid, width).to(self.device, self.dtype).contiguous() for s in given]

    def call_exported(self, inputs):
        """The pipeline's call on the exported inputs (``denoiser_component(...).random_inputs``), as
        ``slimdiff-export`` verifies an engine."""
        named = dict(zip(self.input_names, inputs))
        latents, text = named["hidden_states"], named["encoder_hidden_states"]
        height, width = latents.shape[-2:]
        tokens, img_ids = [pack_latents(latents)], [latent_ids(height // PACK, width // PACK)]
        if REFERENCE_LATENTS in named:  # as the Kontext pipeline appends its reference image
            reference = named[REFERENCE_LATENTS]
            tokens.append(pack_latents(reference))
            img_ids.append(latent_ids(reference.shape[-2] // PACK, reference.shape[-1] // PACK, first=1))
        layout = self.controlnet_samples
        controlnet = {} if layout is None else layout.call([named[name] for name in layout.names])
        out = self(hidden_states=torch.cat(tokens, 1), timestep=named["timestep"], encoder_hidden_states=text,
                   pooled_projections=named["pooled_projections"], img_ids=torch.cat(img_ids),
                   txt_ids=torch.zeros(text.shape[1], 3), guidance=named.get("guidance"), return_dict=False,
                   **controlnet)[0]
        return unpack_latents(out, height, width)
