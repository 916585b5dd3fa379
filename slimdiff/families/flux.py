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

Exported graphs and engines take the latent unpacked, (batch, 16, height, width), and pack it and build the
positions inside the graph, with the rotary table in float32 (:meth:`FluxFamily.export_call`); the engine-backed
transformer (:mod:`slimdiff.runtime.flux`) takes the pipeline's packed call, and so do the benchmark's pipeline-routed
runs (:meth:`FluxFamily.exported_from_call`). ``slimdiff bench`` times calls at sigma 0.5 (the export's timestep is
drawn as a :data:`~slimdiff.families.SIGMA`), one transformer row per image; ``slimdiff eval`` samples from packed
seeded latents (:meth:`FluxFamily.seeded_latents`); both default to FluxPipeline's size (:data:`DEFAULT_SAMPLE_SIZE`).

The blocks' adapters live in :mod:`slimdiff.families.flux_blocks`.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch import nn

from ..errors import SlimDiffError
from .base import (
    CONTROLNET_RESIDUALS,
    FAMILIES,
    LAST_HIDDEN_STATE,
    MODEL_DTYPE,
    POOLER_OUTPUT,
    SIGMA,
    DenoiserFamily,
    ExportInput,
    ServedTextEncoder,
    TextTower,
    downsampled_axis,
    image_generators,
    pipeline_call_default,
)
from .sd import guidance

#: The T5 prompt padded to the pipeline's default ``max_sequence_length``.
T5_TOKENS = 512
#: Latent pixels per side of one packed token: the pipeline packs 2×2 latent patches.
PACK = 2
#: The latent size FluxPipeline samples at by default (its ``default_sample_size``: FLUX.1's 1024 px at the VAE's
#: scale 8); the transformer's config has no ``sample_size``.
DEFAULT_SAMPLE_SIZE = 128


def _transformer_of(obj: Any):
    return obj if isinstance(obj, FluxTransformer2DModel) else getattr(obj, "transformer", None)


def latent_ids(height: int, width: int, *, first: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """(height · width, 3) positions of packed latent tokens on a ``height`` × ``width`` grid, as the pipeline makes
    them (``FluxPipeline._prepare_latent_image_ids``): (first, row, column), row-major. ``first`` is 0 for the
    latent's tokens, 1 for FLUX Kontext's reference image's (``FluxKontextPipeline.prepare_latents``)."""
    # broadcast, not repeat / repeat_interleave: an exported graph keeps these sizes symbolic only this way (the
    # exporter's repeat_interleave fixes the traced size, and a graph serving a range of image sizes breaks)
    rows = torch.arange(height, device=device)[:, None].expand(height, width).reshape(-1)
    columns = torch.arange(width, device=device)[None, :].expand(height, width).reshape(-1)
    return torch.stack([torch.full_like(rows, first), rows, columns], 1).float()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(batch, channels, height, width) latents as the pipeline packs them (``FluxPipeline._pack_latents``):
    (batch, height/2 · width/2, channels · 4), one token per 2×2 patch, row-major."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a ``height`` × ``width`` latent."""
    b, _, features = tokens.shape
    patches = tokens.view(b, height // PACK, width // PACK, features // (PACK * PACK), PACK, PACK)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, features // (PACK * PACK), height, width)


def _grid(ids: torch.Tensor, first: int) -> tuple[int, int] | None:
    """(rows, columns) of the row-major grid whose positions (:func:`latent_ids` with ``first``) ``ids`` are, or
    None."""
    if not len(ids):
        return None
    rows, columns = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if rows * columns == len(ids) and torch.equal(ids.float().cpu(), latent_ids(rows, columns, first=first)):
        return rows, columns
    return None


def packed_grids(img_ids: torch.Tensor, txt_ids: torch.Tensor, tokens: int, text_len: int, *,
                 reference: bool = False) -> list[tuple[int, int]]:
    """The (rows, columns) of the grids of ``tokens`` packed tokens whose positions ``img_ids`` are, as the pipeline
    makes them (``txt_ids`` zeros for ``text_len`` text tokens) — the positions an exported graph builds itself: the
    latent's grid (:func:`latent_ids`), then with ``reference`` FLUX Kontext's reference image's (first coordinate
    1) — or a one-line error for any other positions."""
    img_ids, txt_ids = (ids[0] if ids.ndim == 3 else ids for ids in (img_ids, txt_ids))  # the deprecated 3-D form
    if img_ids.ndim == 2 and img_ids.shape == (tokens, 3) and tokens and tuple(txt_ids.shape) == (text_len, 3) \
            and not txt_ids.any():
        latent = int((img_ids[:, 0] == 0).sum())  # the latent's tokens come first, the reference's after them
        grids = [_grid(img_ids[:latent], 0)] + ([_grid(img_ids[latent:], 1)] if reference else [])
        if None not in grids and (reference or latent == tokens):
            return grids
    what = ("FLUX Kontext pipeline's positions (img_ids a row-major grid of the latent's packed tokens, then one of "
            "the reference image's with first coordinate 1" if reference else
            "text-to-image pipeline's positions (img_ids a row-major grid")
    raise SlimDiffError(f"exported FLUX transformers take the {what} of the {tokens} packed tokens, zero txt_ids for "
                        f"the {text_len} text tokens): got img_ids {tuple(img_ids.shape)} and txt_ids "
                        f"{tuple(txt_ids.shape)} of other positions")


def rotary_table(ids: torch.Tensor, axes_dim: Sequence[int], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's rotary (cos, sin) tables for positions ``ids`` (tokens, axes), as diffusers' ``FluxPosEmbed`` computes
    them but in float32 throughout: diffusers computes the angles in float64, which TensorRT has no type for. The
    frequencies are exact powers in either precision; the angles lose float32's rounding of position × frequency
    (tests/test_flux.py bounds the difference)."""
    cos, sin = [], []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=ids.device) / dim)
        angles = torch.outer(ids[:, axis].float(), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, -1), torch.cat(sin, -1)


class Float32RotaryEmbedding(nn.Module):
    """Stands in for a transformer's ``pos_embed`` while it is exported: :func:`rotary_table` of its axes."""

    def __init__(self, pos_embed: nn.Module):
        super().__init__()
        self.axes_dim, self.theta = tuple(pos_embed.axes_dim), pos_embed.theta

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_table(ids, self.axes_dim, self.theta)


def latent_features(config: Any) -> int:
    """The packed latent's features: what the transformer predicts (``out_channels``, or ``in_channels`` when it
    takes the latent alone, as ``FluxTransformer2DModel`` reads its config; 64, its default, when neither is set)."""
    return config.get("out_channels") or config.get("in_channels") or 64


def input_features(config: Any) -> int:
    """The features of each token the transformer takes (``in_channels``; 64, ``FluxTransformer2DModel``'s default)."""
    return config.get("in_channels") or 64


def is_text_to_image_transformer(config: Any) -> bool:
    """A FLUX transformer whose tokens carry the latent alone (FLUX.1-dev, -schnell, Kontext; not Fill or Control,
    whose tokens carry image conditioning too)."""
    return input_features(config) == latent_features(config)


def calibration_size(pipe: Any, config: Any) -> tuple[int, int, tuple[int, int]]:
    """(height, width, latent size) a FLUX pipeline calibrates at: the configuration's (checked by
    :meth:`~.base.DenoiserFamily.check_image_size`: the pipeline would round a size it cannot pack down, with a
    warning), else the pipeline's default."""
    default = pipe.default_sample_size * pipe.vae_scale_factor
    height, width = config.height or default, config.width or default
    return height, width, (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


def seeded_sampling_loop(family: FluxFamily, pipe: Any, config: Any,
                         image_call: Callable[[Sequence[int], int, int], dict[str, Any]] | None = None
                         ) -> Callable[[Sequence[str], Sequence[int]], None]:
    """``loop(prompts, seeds)``: a FLUX pipeline's own sampling of one batch at the calibration size, from seeded
    packed latents to latents. ``image_call(seeds, height, width)`` gives the call's size and image arguments
    (default: the size alone)."""
    height, width, latent = calibration_size(pipe, config)
    transformer = pipe.transformer

    def run(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        generators = image_generators(seeds)
        latents = family.seeded_latents(transformer.config, latent, generators)
        sized = {"height": height, "width": width} if image_call is None else image_call(seeds, height, width)
        # prompts by name: FluxKontextPipeline takes its image first
        pipe(prompt=list(prompts), num_inference_steps=config.steps, **guidance(config),
             latents=latents.to(device=transformer.device, dtype=transformer.dtype), generator=generators,
             output_type="latent", **sized)

    return run


def split_packed_call(call: dict[str, Any], pipeline: str, *, reference: bool = False
                      ) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """A copy of ``pipeline``'s packed transformer call without its positions (``img_ids``, ``txt_ids``) and its
    empty ``joint_attention_kwargs``, and the grids those positions are (:func:`packed_grids`, with ``reference``)."""
    call = dict(call)
    if not call.get("joint_attention_kwargs"):  # the FLUX pipelines pass {} when they have none
        call.pop("joint_attention_kwargs", None)
    packed, text = call["hidden_states"], call.get("encoder_hidden_states")
    img_ids, txt_ids = call.pop("img_ids", None), call.pop("txt_ids", None)
    if packed.ndim != 3 or text is None or img_ids is None or txt_ids is None:
        raise SlimDiffError(f"expected {pipeline}'s call: packed hidden_states (B,N,C), encoder_hidden_states, "
                            "img_ids and txt_ids")
    return call, packed_grids(img_ids, txt_ids, packed.shape[1], text.shape[1], reference=reference)


def packed_call(transformer: nn.Module, tokens: torch.Tensor, img_ids: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                guidance: torch.Tensor | None, **controlnet: Any) -> torch.Tensor:
    """The transformer's packed prediction for packed ``tokens`` at positions ``img_ids`` (zero ``txt_ids``), with
    the rotary table in float32 (:func:`rotary_table`): what exported graphs compute once they have packed their
    inputs. ``controlnet``: a ControlNet's samples, as :meth:`ControlNetSamples.call` passes them."""
    with float32_rotary(transformer):
        return transformer(hidden_states=tokens, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                           pooled_projections=pooled_projections, img_ids=img_ids,
                           txt_ids=text_ids(encoder_hidden_states), guidance=guidance, return_dict=False,
                           **controlnet)[0]


def text_ids(encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """The zero positions of the text tokens, as the pipelines make them."""
    return encoder_hidden_states.new_zeros(encoder_hidden_states.shape[1], 3, dtype=torch.float32)


@contextmanager
def float32_rotary(module: nn.Module):
    """``module`` (a FLUX transformer or ControlNet) computing its rotary table in float32 (:func:`rotary_table`)
    while the context lasts: exported graphs compute it so."""
    pos_embed = module.pos_embed
    module.pos_embed = Float32RotaryEmbedding(pos_embed)
    try:
        yield module
    finally:
        module.pos_embed = pos_embed


#: The export option (:attr:`DenoiserFamily.export_options`) of FLUX transformers that also take a ControlNet's block
#: samples; recorded with their layout (:attr:`ControlNetSamples.option`).
CONTROLNET_SAMPLES = "controlnet-samples"
#: Names of the exported sample inputs: the double-stream blocks' samples, then the single-stream blocks'.
BLOCK_SAMPLE = "controlnet_block_sample_{}"
SINGLE_BLOCK_SAMPLE = "controlnet_single_block_sample_{}"


def default_guidance(pipe: Any, device: str | torch.device) -> torch.Tensor:
    """The guidance scale ``pipe`` embeds when given none (its ``guidance_scale`` default), as a denoiser's input."""
    scale = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    return torch.full((1,), float(scale), device=device)


@dataclass(frozen=True)
class ControlNetSamples:
    """What a FLUX ControlNet (``FluxControlNetModel``) gives the transformer: one sample per double-stream block of its
    own (``double``), one per single-stream block (``single``), each (batch, packed tokens, hidden width); and whether
    the transformer adds them in turn after every block (``repeat``: XLabs' ControlNets, with a conditioning
    embedding, for which the pipeline passes ``controlnet_blocks_repeat``) or each after a run of consecutive blocks
    (``FluxTransformer2DModel.forward``'s interval). Exported graphs take the samples on the latent's packed grid,
    (batch, height/2, width/2, hidden width) — the pipeline's tokens, row-major, viewed as the grid — and do what
    transformer's forward does with them."""

    double: int
    single: int
    repeat: bool = False

    @classmethod
    def of(cls, controlnet: Any) -> ControlNetSamples:
        """The samples ``controlnet`` gives (a ``FluxMultiControlNetModel`` sums its nets' samples: one line unless
        they give the same)."""
        layouts = {cls(net.config["num_layers"], net.config["num_single_layers"],
                       net.config.get("conditioning_embedding_channels") is not None)
                   for net in getattr(controlnet, "nets", [controlnet])}
        if len(layouts) > 1:
            raise SlimDiffError(f"the ControlNets of {type(controlnet).__name__} give samples of different layouts "
                                f"({', '.join(sorted(layout.option for layout in layouts))}): the pipeline cannot sum "
                                "them")
        return layouts.pop()

    @property
    def option(self) -> str:
        """The export option recording this layout: ``controlnet-samples:<double>:<single>[:repeat]``."""
        return f"{CONTROLNET_SAMPLES}:{self.double}:{self.single}" + (":repeat" if self.repeat else "")

    @classmethod
    def parse(cls, option: str) -> ControlNetSamples | None:
        """The layout an export option records, None for another option; one line for a malformed one."""
        kind, *fields = option.split(":")
        if kind != CONTROLNET_SAMPLES:
            return None
        if len(fields) in (2, 3) and all(f.isdigit() for f in fields[:2]) and fields[2:] in ([], ["repeat"]):
            return cls(int(fields[0]), int(fields[1]), fields[2:] == ["repeat"])
        raise SlimDiffError(f"export option {option!r}: expected {CONTROLNET_SAMPLES}:<double>:<single>[:repeat]")

    def describe(self) -> str:
        return f"{self.double} double- + {self.single} single-stream" + (", repeated over the blocks" if self.repeat
                                                                           else "")

    @property
    def names(self) -> list[str]:
        return [BLOCK_SAMPLE.format(i) for i in range(self.double)] + \
            [SINGLE_BLOCK_SAMPLE.format(i) for i in range(self.single)]

    def inputs(self, config: Any) -> tuple[ExportInput, ...]:
        """The samples as exported inputs of a transformer of ``config`` (whose hidden width they have)."""
        dims = ("batch", downsampled_axis("height", PACK), downsampled_axis("width", PACK),
                config["num_attention_heads"] * config["attention_head_dim"])
        return tuple(ExportInput(name, dims, MODEL_DTYPE) for name in self.names)

    def named(self, call: dict[str, Any], rows: int, columns: int) -> dict[str, torch.Tensor]:
        """The exported sample inputs by name of a pipeline's transformer ``call`` (its ``controlnet_block_samples``,
        ``controlnet_single_block_samples`` and ``controlnet_blocks_repeat`` taken out of it) on a ``rows`` ×
        ``columns`` packed grid; one line for samples of another layout."""
        blocks, singles = call.pop("controlnet_block_samples", None), call.pop("controlnet_single_block_samples", None)
        repeat = bool(call.pop("controlnet_blocks_repeat", False))
        given = ControlNetSamples(len(blocks or ()), len(singles or ()), repeat)
        if given != self:
            raise SlimDiffError(f"got ControlNet samples {given.describe()}; the exported call takes {self.describe()}")
        return {name: s.reshape(s.shape[0], rows, columns, s.shape[-1])
                for name, s in zip(self.names, (*(blocks or ()), *(singles or ())))}

    def call(self, samples: Sequence[torch.Tensor]) -> dict[str, Any]:
        """The transformer's keyword arguments passing ``samples`` (this layout's, on the packed grid) as the pipeline
        passes them: token sequences, None for a kind the ControlNet gives none of."""
        tokens = [s.reshape(s.shape[0], -1, s.shape[-1]) for s in samples]
        return {"controlnet_block_samples": tokens[:self.double] or None,
                "controlnet_single_block_samples": tokens[self.double:] or None,
                "controlnet_blocks_repeat": self.repeat}


@FAMILIES.register({FluxPipeline: "flux", FluxTransformer2DModel: "flux"})
class FluxFamily(DenoiserFamily):
    """``transformer(hidden_states, encoder_hidden_states=…, pooled_projections=…, timestep=…, img_ids=…,
    txt_ids=…, guidance=…)``; CLIP-L and T5 text towers; the pipeline's own flow-matching sampler."""

    name = "flux"
    text_tokens = T5_TOKENS
    component = "transformer"
    shares_text_context = False  # context_embedder (and every block) sits between the call's text and attention
    def guided_rows_per_image(self, config: Any) -> int:
        return 1  # guidance is embedded (FLUX.1-dev) or absent (schnell): no classifier-free batch

    # The exported call takes the latent unpacked, (batch, channels, height, width), and packs it and builds the
    # positions (img_ids, txt_ids) inside the graph: the engine's axes are then the latent's height and width, as
    # every other family's, and the engine-backed transformer (slimdiff.runtime.flux) unpacks the pipeline's
    # packed call after checking that its positions are the ones the graph builds.
    static_axes = ()

    # A ControlNet's block samples as inputs too (slimdiff-export --controlnet-inputs), their layout the ControlNet's
    export_options = (CONTROLNET_SAMPLES,)
    controlnet_samples: ControlNetSamples | None = None

    def with_export_options(self, options: Collection[str]) -> DenoiserFamily:
        if CONTROLNET_RESIDUALS in options:
            raise SlimDiffError(f"{self.name} transformers take a ControlNet's block samples, not a UNet's residuals: "
                                "their layout is the ControlNet's")
        layouts = [layout for layout in map(ControlNetSamples.parse, options) if layout is not None]
        if len(set(layouts)) > 1:
            raise SlimDiffError(f"{self.name} engines take one ControlNet's samples, not {len(set(layouts))} layouts")
        variant = super().with_export_options([CONTROLNET_SAMPLES if ControlNetSamples.parse(o) else o
                                               for o in options])
        if layouts:  # the options as given: the layout is recorded with an engine built from the variant
            variant.controlnet_samples, variant.exporting = layouts[0], frozenset(options)
        return variant

    def controlnet_export_option(self, controlnet: Callable[[], Any]) -> str:
        if CONTROLNET_SAMPLES not in self.export_options:  # FLUX Fill, Control, Kontext
            raise SlimDiffError(f"{self.name} transformers take no ControlNet (their pipeline passes none): leave out "
                                "--controlnet-inputs and --controlnet")
        net = controlnet()
        if net is None:
            raise SlimDiffError(f"a {self.name} transformer takes as many ControlNet samples as its ControlNet gives: "
                                "export --controlnet-inputs from a FluxControlNetPipeline (a folder, "
                                "builtin:tiny-flux-controlnet, or a slim folder slimmed in one)")
        return ControlNetSamples.of(net).option

    def export_inputs(self, config: Any) -> tuple[ExportInput, ...]:
        inputs = [
            ExportInput("hidden_states", ("batch", config["in_channels"] // PACK**2, "height", "width"), MODEL_DTYPE),
            ExportInput("timestep", ("batch",), "float32", draw=SIGMA),  # the flow-matching sigma, as passed
            ExportInput("encoder_hidden_states", ("batch", "text_len", config["joint_attention_dim"]), MODEL_DTYPE),
            ExportInput("pooled_projections", ("batch", config["pooled_projection_dim"]), MODEL_DTYPE),
        ]
        if config.get("guidance_embeds"):  # FLUX.1-dev; FLUX.1-schnell takes none
            inputs.append(ExportInput("guidance", ("batch",), "float32", high=10.0))
        if self.controlnet_samples is not None:
            inputs += self.controlnet_samples.inputs(config)
        return tuple(inputs)

    def export_call(self, transformer: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                    *rest: torch.Tensor) -> torch.Tensor:
        # rest: the guidance (FLUX.1-dev), then a ControlNet's samples (exported with them)
        guided = bool(transformer.config.get("guidance_embeds"))
        guidance, samples = (rest[0] if guided else None), rest[int(guided):]
        controlnet = {} if self.controlnet_samples is None else self.controlnet_samples.call(samples)
        height, width = hidden_states.shape[-2:]
        out = packed_call(transformer, pack_latents(hidden_states),
                          latent_ids(height // PACK, width // PACK, device=hidden_states.device), timestep,
                          encoder_hidden_states, pooled_projections, guidance, **controlnet)
        return unpack_latents(out, height, width)

    def latent_multiple(self, config: Any) -> int:
        return PACK

    def sample_size(self, config: Any) -> tuple[int, int]:
        return DEFAULT_SAMPLE_SIZE, DEFAULT_SAMPLE_SIZE

    def seeded_latents(self, config: Any, latent: tuple[int, int], generators: Sequence[torch.Generator]
                       ) -> torch.Tensor:
        # already packed, (images, h/2 · w/2, 64): i.i.d. noise, which packing only reorders; the latent's features,
        # not the input's (FLUX Fill's tokens carry more)
        h, w = latent
        return torch.cat([torch.randn((1, (h // PACK) * (w // PACK), latent_features(config)), generator=g)
                          for g in generators])

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=self.text_tokens)
        inputs = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if pipe.transformer.config.get("guidance_embeds"):
            inputs["guidance"] = default_guidance(pipe, device)
        return inputs

    def exported_from_call(self, call: dict[str, Any]) -> tuple[dict[str, Any], Callable[[torch.Tensor], torch.Tensor]]:
        # the pipeline's packed call, unpacked as the exported graph takes it; its positions are the graph's own
        call, ((rows, columns),) = split_packed_call(call, "FluxPipeline")
        call["hidden_states"] = unpack_latents(call["hidden_states"], rows * PACK, columns * PACK)
        if self.controlnet_samples is not None:  # a ControlNet's samples, on the packed grid
            call.update(self.controlnet_samples.named(call, rows, columns))
        return call, pack_latents

    def accepts(self, obj: Any) -> bool:
        # text-to-image tokens carry the latent alone (FLUX Fill's and FLUX Control's carry image conditioning too)
        transformer = _transformer_of(obj)
        return transformer is not None and is_text_to_image_transformer(transformer.config)

    def build(self, config: dict) -> nn.Module:
        return FluxTransformer2DModel.from_config(dict(config))

    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor:
        sigma = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        return torch.round(sigma * 1000)  # the scheduler's timestep, as the transformer's embedding sees it

    def text_context(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return None

    def kept_prediction(self, kwargs: dict, prediction: torch.Tensor) -> torch.Tensor:
        # the latent's tokens (first position coordinate 0) come first; FLUX Kontext's pipeline drops the reference
        # image's after them. Told by the call, not the family: a Kontext transformer is FLUX.1-dev's to family_for
        img_ids = kwargs.get("img_ids")
        if img_ids is None:
            return prediction
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # the deprecated 3-D form
        return prediction[:, :int((ids[:, 0] == 0).sum())]

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
        return seeded_sampling_loop(self, pipe, config)

    def text_towers(self, pipe: Any) -> list[TextTower]:
        return [TextTower(pipe.tokenizer, pipe.text_encoder), TextTower(pipe.tokenizer_2, pipe.text_encoder_2)]

    serving_pipeline = "FluxPipeline"
    serving_img2img_pipeline = "FluxImg2ImgPipeline"

    def served_text_encoders(self, pipe: Any) -> tuple[ServedTextEncoder, ...]:
        # CLIP-L: its pooler_output (the pooled projections), over tokenizer_max_length tokens. The T5: [0], the last
        # hidden state (the prompt embedding), over max_sequence_length tokens; neither takes an attention mask.
        return (ServedTextEncoder("text_encoder", "tokenizer", (POOLER_OUTPUT,), tokens=pipe.tokenizer_max_length),
                ServedTextEncoder("text_encoder_2", "tokenizer_2", (LAST_HIDDEN_STATE,),
                                  tokens=int(pipeline_call_default(pipe, "max_sequence_length"))))
