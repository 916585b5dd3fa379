"""The exportable components as plain ``forward(*tensors) -> tensor`` modules, with their I/O specs.

Exporters and engines only ever see these wrappers: fixed positional inputs, one output, no dicts, so the
same wrapper serves ``torch.onnx.export``, ``torch.export`` and the PyTorch reference in parity checks. The
denoiser's inputs and its positional call come from its model family (:meth:`DenoiserFamily.export_inputs`,
:meth:`DenoiserFamily.export_call`): one code path for the SD and SDXL UNets and the PixArt transformer.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SlimDiffError
from ..families import (
    KEEP_MASK,
    LAST_HIDDEN_STATE,
    MODEL_DTYPE,
    PENULTIMATE_HIDDEN_STATE,
    POOLER_OUTPUT,
    SIGMA,
    TEXT_EMBEDS,
    TIMESTEP,
    ExportInput,
    controlnet_adapter,
    family_for,
)
from .shapes import ENGINE_AXES, PAIRED_AXES, Profile, Range, split_axis, tensor_shapes

TEXT_ENCODER_OUTPUTS = (LAST_HIDDEN_STATE, PENULTIMATE_HIDDEN_STATE, TEXT_EMBEDS, POOLER_OUTPUT)


@dataclass
class Component:
    name: str  # the denoiser's pipeline attribute (unet | transformer) | text_encoder | vae_decoder
    module: nn.Module
    inputs: list[ExportInput]
    output: str  # the (first) output's name; output shapes are read off the exported graph
    clip: dict[str, int] = field(default_factory=dict)  # axis caps (the text encoder's positions)
    # axis maxima the component cannot serve beyond (a DiT's stored position table): a range past one is refused
    limits: dict[str, tuple[int, str]] = field(default_factory=dict)
    attention_modules: int = 0  # SDPA calls per forward: what a fused export must turn into Attention ops
    more_outputs: tuple[str, ...] = ()  # outputs after the first (SDXL's second text encoder: text_embeds)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.output, *self.more_outputs)

    def torch_dtype(self, spec: ExportInput, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if spec.dtype == MODEL_DTYPE else getattr(torch, spec.dtype)

    def random_inputs(self, values: dict[str, int], model_dtype: torch.dtype, seed: int,
                      device: str | torch.device = "cpu") -> list[torch.Tensor]:
        """Seeded random inputs with axis sizes ``values``, drawn as each input's ``draw`` says: N(0,1)
        latents/embeddings, timesteps in [0, 1000), sigmas in [0, 1), token ids in range, padding masks that mask
        some tokens."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for spec in self.inputs:
            shape = tensor_shapes(spec.dims, {a: min(v, self.clip.get(a, 1 << 30)) for a, v in values.items()})
            if spec.dtype == "int64" and spec.draw != KEEP_MASK:
                t = torch.randint(0, int(spec.high), shape, generator=gen)
            elif spec.draw == TIMESTEP:
                t = torch.rand(shape, generator=gen) * 999
            elif spec.draw == SIGMA:
                t = torch.rand(shape, generator=gen)
            elif spec.draw == KEEP_MASK:
                kept = torch.randint(1, max(shape[-1], 2), shape[:-1] + (1,), generator=gen)
                t = (torch.arange(shape[-1]) < kept).float()
            elif spec.high:
                t = torch.rand(shape, generator=gen) * spec.high
            else:
                t = torch.randn(shape, generator=gen)
            out.append(t.to(device=device, dtype=self.torch_dtype(spec, model_dtype)))
        return out


class _Denoiser(nn.Module):
    """The denoiser called positionally as its family's :meth:`~slimdiff.families.DenoiserFamily.export_call`."""

    def __init__(self, denoiser: nn.Module, family):
        super().__init__()
        self.denoiser = denoiser
        self._call = family.export_call

    def forward(self, *inputs):
        return self._call(self.denoiser, *inputs)


class _TextEncoder(nn.Module):
    """A transformers text encoder returning the outputs named in ``outputs`` (see
    :class:`~slimdiff.families.ServedTextEncoder`): one tensor, or a tuple of them in that order."""

    def __init__(self, text_encoder, outputs: tuple[str, ...]):
        super().__init__()
        self.text_encoder = text_encoder
        self.outputs = outputs

    def forward(self, input_ids, attention_mask=None):
        hidden = PENULTIMATE_HIDDEN_STATE in self.outputs
        out = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=hidden,
                                return_dict=True)
        tensors = tuple(out.hidden_states[-2] if name == PENULTIMATE_HIDDEN_STATE else getattr(out, name)
                        for name in self.outputs)
        return tensors if len(tensors) > 1 else tensors[0]


class _VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(nn.Module):
    """The VAE posterior's parameters (mean and log-variance stacked on the channels) of an image that comes folded
    onto the latent grid: (batch, 3·s², h, w) for an image of h·s × w·s pixels (s: the VAE's scale). Engine axes are
    latent axes; folding (``pixel_unshuffle``, undone here) keeps the image on them, exactly."""

    def __init__(self, vae, scale: int):
        super().__init__()
        self.vae, self.scale = vae, scale

    def forward(self, folded_image):
        image = nn.functional.pixel_shuffle(folded_image, self.scale)
        return self.vae.encode(image).latent_dist.parameters


def count_attention(module: nn.Module) -> int:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    # diffusers' newer attention classes (FLUX's FluxAttention) share a mixin, not the Attention class
    return sum(isinstance(m, (Attention, AttentionModuleMixin)) for m in module.modules())


def denoiser_component(denoiser: nn.Module, export_options: Collection[str] = (), family=None) -> Component:
    """The denoiser (a UNet or a DiT, dense or slim) as an exportable component, named after its pipeline attribute
    (``unet``, ``transformer``): its inputs and call as its family declares them — ``family``, the family of the
    pipeline it serves, where the denoiser cannot say (FLUX Kontext's transformer has FLUX.1-dev's configuration);
    default ``family_for(denoiser)`` — with the family's optional input groups ``export_options``
    (:attr:`~slimdiff.families.DenoiserFamily.export_options`: ControlNet residuals)."""
    family = (family or family_for(denoiser)).with_export_options(export_options)
    return Component(family.component, _Denoiser(denoiser, family).eval(),
                     inputs=list(family.export_inputs(denoiser.config)), output="out_sample",
                     attention_modules=count_attention(denoiser), limits=family.export_limits(denoiser.config))


def text_encoder_component(text_encoder, name: str = "text_encoder",
                           outputs: tuple[str, ...] = (LAST_HIDDEN_STATE,), *,
                           attention_mask: bool = False) -> Component:
    """A text encoder taking ``input_ids`` (and the tokenizer's ``attention_mask``, 1 keep / 0 padding, when
    ``attention_mask``), named ``name`` (its pipeline attribute), returning ``outputs`` (default: SD-1.x's
    conditioning, the last hidden state). Its text length is capped at its position table (CLIP's 77); a T5's
    relative positions set none."""
    cfg = text_encoder.config
    unknown = [o for o in outputs if o not in TEXT_ENCODER_OUTPUTS]
    if unknown or not outputs:
        raise SlimDiffError(f"{name}: a served text encoder returns some of {', '.join(TEXT_ENCODER_OUTPUTS)}, "
                            f"not {', '.join(unknown) or 'nothing'}")
    if TEXT_EMBEDS in outputs and not hasattr(text_encoder, "text_projection"):
        raise SlimDiffError(f"{name}: {type(text_encoder).__name__} has no text projection, so no {TEXT_EMBEDS}")
    return Component(
        name, _TextEncoder(text_encoder, tuple(outputs)).eval(),
        inputs=[ExportInput("input_ids", ("batch", "text_len"), "int64", high=cfg.vocab_size),
                *([ExportInput("attention_mask", ("batch", "text_len"), "int64", draw=KEEP_MASK)]
                  if attention_mask else [])],
        output=outputs[0], more_outputs=tuple(outputs[1:]),
        clip={"text_len": cfg.max_position_embeddings} if hasattr(cfg, "max_position_embeddings") else {},
        attention_modules=cfg.num_hidden_layers,
    )


def vae_decoder_component(vae) -> Component:
    cfg = vae.config
    return Component(
        "vae_decoder", _VaeDecoder(vae).eval(),
        inputs=[ExportInput("latent_sample", ("batch", cfg.latent_channels, "height", "width"), MODEL_DTYPE)],
        output="sample",
        attention_modules=count_attention(vae.decoder),
    )


def vae_encoder_component(vae, scale: int) -> Component:
    """The VAE encoder as an engine component (:class:`_VaeEncoder`): what an inpainting pipeline samples the masked
    image's latent from."""
    return Component(
        VAE_ENCODER, _VaeEncoder(vae, scale).eval(),
        inputs=[ExportInput("folded_image", ("batch", vae.config.in_channels * scale * scale, "height", "width"),
                            MODEL_DTYPE)],
        output="latent_parameters",
        attention_modules=count_attention(vae.encoder),
    )


#: The served VAE encoder's model and engine name.
VAE_ENCODER = "vae_encoder"

#: A ControlNet engine's component name (its pipeline attribute).
CONTROLNET = "controlnet"


class _ControlNet(nn.Module):
    """A ControlNet called positionally as its kind's :meth:`~slimdiff.families.ControlNetAdapter.export_call`."""

    def __init__(self, controlnet, adapter):
        super().__init__()
        self.controlnet = controlnet
        self._call = adapter.export_call

    def forward(self, *inputs):
        return self._call(self.controlnet, *inputs)


def controlnet_component(controlnet) -> Component:
    """A ControlNet as an engine component, as its kind's adapter declares it (:func:`~slimdiff.families.
    controlnet_adapter`): the denoiser call's inputs and the control image; out: what a denoiser engine built with
    ``--controlnet-inputs`` takes, under the same names. One line for a ControlNet whose engine is not built."""
    adapter = controlnet_adapter(controlnet)
    adapter.check_engine(controlnet, f"this {type(controlnet).__name__}")
    outputs = adapter.export_outputs(controlnet)
    return Component(CONTROLNET, _ControlNet(controlnet, adapter).eval(),
                     inputs=list(adapter.export_inputs(controlnet)), output=outputs[0],
                     more_outputs=tuple(outputs[1:]), attention_modules=count_attention(controlnet))


# ----------------------------------------------------------------------------------------------------------
# Axis ranges of one component, and how torch.export sees them
# ----------------------------------------------------------------------------------------------------------


def component_axes(component: Component, full: Profile, multiples: dict[str, int]) -> dict[str, dict]:
    """The axes ``component`` uses, clipped to what it accepts, with the multiple each must be."""
    used = {split_axis(d)[0] for spec in component.inputs for d in spec.dims if isinstance(d, str)}
    out = {}
    for axis in ENGINE_AXES:
        if axis not in used:
            continue
        r = full.axis(axis)
        flag = PAIRED_AXES.get(axis, axis)  # a reference image's axis takes its range from the latent's flag
        limit, why = component.limits.get(axis, component.limits.get(flag, (None, "")))
        if limit is not None and r.max > limit:
            raise SlimDiffError(f"{component.name}: a latent {axis} of up to {r.max} is asked for, but {why}: at most "
                                f"{limit}; ask for a smaller --{flag}")
        cap = component.clip.get(axis)
        if cap is not None:
            if r.min > cap:
                raise SlimDiffError(f"{component.name}: {axis} range {r} starts above its limit {cap}")
            r = Range(r.min, min(r.opt, cap), min(r.max, cap))
        out[axis] = {"min": r.min, "opt": r.opt, "max": r.max, "multiple": multiples.get(flag, 1)}
    return out


def torch_dynamic_shapes(component: Component, axes: dict[str, dict]) -> dict:
    from torch.export import Dim

    # Each dynamic axis is one symbol times its multiple; a down-sampled axis ("height/4") is the same symbol times
    # a smaller factor, so torch.export ties the sizes together (ControlNet residuals at a UNet's levels).
    symbols = {axis: Dim(f"{axis}_{r['multiple']}" if r["multiple"] > 1 else axis, min=r["min"] // r["multiple"],
                         max=r["max"] // r["multiple"])
               for axis, r in axes.items() if r["min"] != r["max"]}  # the others are static

    def dim(name: str):
        axis, factor = split_axis(name)
        if axis not in symbols:
            return None
        multiple = axes[axis]["multiple"]
        if multiple % factor:
            raise SlimDiffError(f"{component.name}: an input is down-sampled by {factor} along {axis}, which must "
                                f"then be a multiple of {factor}, not of {multiple}")
        scale = multiple // factor
        return scale * symbols[axis] if scale > 1 else symbols[axis]

    shapes = tuple({i: dim(d) for i, d in enumerate(spec.dims) if isinstance(d, str) and dim(d) is not None}
                   for spec in component.inputs)
    # torch.export matches these to forward's parameters: the denoiser's and the ControlNet's wrappers have one,
    # ``*inputs``
    return (shapes,) if isinstance(component.module, (_Denoiser, _ControlNet)) else shapes


def example_values(axes: dict[str, dict]) -> dict[str, int]:
    """Tracing sizes: ``opt``, but never 1 on a dynamic axis (torch.export would specialise a size-1 axis)."""
    return {a: (min(2, r["max"]) if r["opt"] == 1 else r["opt"]) for a, r in axes.items()}


def parity_shapes(axes: dict[str, dict]) -> list[dict[str, int]]:
    """The shapes the parity check runs: opt, and min when it differs (two shapes through one graph)."""
    opt = {a: r["opt"] for a, r in axes.items()}
    low = {a: r["min"] for a, r in axes.items()}
    return [opt] if low == opt else [opt, low]
