"""The model-family seam: what slimdiff needs to know about a model, behind two registries.

Two things change independently when a new model arrives, so there is one registry per axis:

* **Block adapters** (:data:`BLOCKS`), keyed by transformer-block class (diffusers' ``BasicTransformerBlock``,
  SD3's ``JointTransformerBlock``, FLUX's two block classes). A :class:`BlockAdapter` knows a block's
  compressible sites (FFN, per-head Q·K and V·O of each attention), reads and replaces their Linear layers,
  names the hook points calibration observes (:class:`SublayerTaps`), and counts the MACs a unit of rank costs.
* **Denoiser families** (:data:`FAMILIES`), keyed by pipeline or denoiser class (SD-1.x/2.x UNets, SDXL,
  PixArt…). A :class:`DenoiserFamily` knows the denoiser's call signature and extra inputs, dummy inputs for
  counting and export, the pipeline's own calibration loop and its text towers.

Registration follows ModelOpt's plugin registry::

    @BLOCKS.register({BasicTransformerBlock: "BasicTransformerBlock"})
    class BasicTransformerBlockAdapter(BlockAdapter): ...

The statistics calibration collects are typed records (:class:`FFNStatistics`, :class:`AttentionStatistics`)
whose storage keys are composed in one place (:func:`stat_key`), so the writer (calibration hooks) and the
reader (the slimming driver) cannot drift apart. The math (analyze / decompose / allocate) never imports this
package; only the stages that touch a real model do.
"""

from __future__ import annotations

import copy
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Generic, Iterator, NamedTuple, Sequence, TypeVar

import torch
from torch import nn

from ..errors import SlimDiffError

# Kinds of compressible site: what a rank counts and which closed form rebuilds it.
FFN, QK, VO = "ffn", "qk", "vo"
# Which tokens an attention's keys and values come from.
SELF, CROSS = "self", "cross"


# ----------------------------------------------------------------------------------------------------------
# Sites: the units that get a rank
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSite:
    """One functional group of one transformer block: the unit that gets a rank.

    ``name`` is ``<block path>.<sublayer>`` for an FFN and ``<block path>.<sublayer>.qk`` / ``.vo`` for the two
    groups of an attention. ``sublayer`` is the attribute path of the FFN or attention inside its block (its
    statistics are stored under ``<block>.<sublayer>``); ``attn`` repeats it for attention sites (None for an
    FFN) and ``attention`` says whether that attention is self- or cross-attention.
    ``width`` is what the rank counts: FFN inner neurons, or the per-head width of an attention group.
    ``unit_params`` is the parameter count removed when the rank drops by one (exact, biases included).
    """

    name: str
    kind: str  # FFN | QK | VO
    block: str  # path of the transformer block in the denoiser
    attn: str | None  # attention sub-layer of the block ("attn1", "attn2") for QK/VO sites
    width: int
    heads: int
    unit_params: int
    sublayer: str = "ff"
    attention: str | None = None  # SELF | CROSS for QK/VO sites

    @property
    def params(self) -> int:
        return self.width * self.unit_params

    @property
    def sublayer_path(self) -> str:
        """Path of the FFN / attention module in the denoiser (and the prefix of its statistics)."""
        return f"{self.block}.{self.sublayer}"


def _parameters(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": weight, **({f"{name}.bias": bias} if bias is not None else {})}


# -- a column block of a shared Linear (FLUX's single-stream blocks) --------------------------------------------
#
# FLUX's single-stream block projects the attention's head outputs z and the MLP's activation h side by side with
# one Linear, ``proj_out(cat([z, h]))``: its input columns fall into blocks, each owned by one site (V·O owns z's
# columns, the FFN h's). To the closed forms a block is the site's own output (down) projection, W_O z + W_D h being
# the sum of the two sites' contributions; the shared bias belongs to one block. A slimmed site narrows its block:
# the adapter rebuilds the shared Linear around it (:func:`with_column_block`, the other blocks' columns kept), the
# site's new columns travel under :func:`column_block_key`, and :func:`slimdiff.families.assemble_column_blocks`
# writes every block's columns into the one weight when the slim weights are loaded.


@dataclass(frozen=True)
class ColumnBlock:
    """Input columns ``[start, stop)`` of ``linear``, block ``index`` of the Linear's column blocks, seen as a Linear
    of its own: its ``weight`` is those columns, its ``bias`` the shared bias if this block ``owns_bias`` (it is
    counted once), and calling it gives the block's part of the output, ``W[:, start:stop] x[start:stop] (+ b)``."""

    linear: nn.Linear
    start: int
    stop: int
    index: int
    owns_bias: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[:, self.start:self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias if self.owns_bias else None

    @property
    def in_features(self) -> int:
        return self.stop - self.start

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """This block's part of an input of the shared Linear."""
        return x[..., self.start:self.stop]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The block's part of the shared Linear's output for the shared Linear's input ``x``."""
        return torch.nn.functional.linear(self.columns(x), self.weight, self.bias)


def column_blocks(linear: nn.Linear, widths: Sequence[int], owner_of_bias: int = 0) -> list[ColumnBlock]:
    """``linear``'s input columns as consecutive blocks of ``widths``; block ``owner_of_bias`` holds the bias."""
    if sum(widths) != linear.in_features:
        raise SlimDiffError(f"column blocks of widths {list(widths)} do not cover a Linear of {linear.in_features} "
                            "input features")
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [ColumnBlock(linear, start, start + width, i, owns_bias=i == owner_of_bias)
            for i, (start, width) in enumerate(zip(starts, widths))]


_COLUMN_BLOCK_KEY = re.compile(r"^(?P<linear>.+)\.weight\[columns (?P<index>\d+)\]$")


def column_block_key(name: str, index: int) -> str:
    """The slim-weights key of the new columns of block ``index`` of the Linear ``name`` (not a state-dict key: it
    is assembled into ``<name>.weight`` at load)."""
    return f"{name}.weight[columns {index}]"


def parse_column_block_key(key: str) -> tuple[str, int] | None:
    """(Linear path, block index) of a :func:`column_block_key`, None for any other key."""
    match = _COLUMN_BLOCK_KEY.match(key)
    return None if match is None else (match["linear"], int(match["index"]))


def with_column_block(shared: nn.Linear, widths: Sequence[int], index: int, width: int) -> nn.Linear:
    """A Linear like ``shared`` (input columns in blocks of ``widths``) whose block ``index`` has ``width`` columns,
    left uninitialised (its weights are loaded next); the other blocks' columns and the bias are copied."""
    new_widths = [width if i == index else w for i, w in enumerate(widths)]
    new = nn.utils.skip_init(nn.Linear, sum(new_widths), shared.out_features, bias=shared.bias is not None,
                             device=shared.weight.device, dtype=shared.weight.dtype)
    with torch.no_grad():
        for old, block in zip(column_blocks(shared, widths), column_blocks(new, new_widths)):
            if old.index != index:
                block.weight.copy_(old.weight)
        if shared.bias is not None:
            new.bias.copy_(shared.bias)
    if hasattr(shared, "_tp_packed_row_blocks"):  # diffusers' tensor-parallel plan shards by these blocks
        new._tp_packed_row_blocks = new_widths
    return new


def _role_parameters(name: str, module: nn.Linear | ColumnBlock, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The slim-weights entries of the Linear (or column block of one) ``module`` at ``name``."""
    if isinstance(module, ColumnBlock):
        return {column_block_key(name, module.index): weight, **({f"{name}.bias": bias} if bias is not None else {})}
    return _parameters(name, weight, bias)


@dataclass(frozen=True)
class FFNLinears:
    """The two Linears of an FFN site: ``proj`` (the up projection, content and gate rows stacked when
    ``gated``) and ``down`` (a :class:`ColumnBlock` where the down projection shares its Linear with another site).
    ``names`` maps each role to its module path inside the block."""

    proj: nn.Linear
    down: nn.Linear | ColumnBlock
    gated: bool
    names: dict[str, str]

    def modules(self) -> dict[str, nn.Linear]:
        return {"proj": self.proj, "down": self.down}

    def shapes_at(self, rank: int, heads: int = 1) -> dict[str, tuple[int, int]]:
        """(in, out) features of each role at inner width ``rank``."""
        return {"proj": (self.proj.in_features, (2 if self.gated else 1) * rank),
                "down": (rank, self.down.out_features)}

    def parameters_at(self, role: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Slim-weights entries (relative to the block) of the Linear playing ``role`` with a new weight and bias
        (state-dict entries, or a :func:`column_block_key` for a column block)."""
        return _role_parameters(self.names[role], self.modules()[role], weight, bias)


@dataclass(frozen=True)
class QKLinears:
    """Query and key projections of one attention (per-head widths shrink together)."""

    q: nn.Linear
    k: nn.Linear
    names: dict[str, str]

    def modules(self) -> dict[str, nn.Linear]:
        return {"q": self.q, "k": self.k}

    def shapes_at(self, rank: int, heads: int = 1) -> dict[str, tuple[int, int]]:
        return {"q": (self.q.in_features, heads * rank), "k": (self.k.in_features, heads * rank)}

    def parameters_at(self, role: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return _parameters(self.names[role], weight, bias)


@dataclass(frozen=True)
class VOLinears:
    """Value projection and output projection of one attention (``out``'s input columns follow ``v``'s rows; a
    :class:`ColumnBlock` where the output projection shares its Linear with another site)."""

    v: nn.Linear
    out: nn.Linear | ColumnBlock
    names: dict[str, str]

    def modules(self) -> dict[str, nn.Linear]:
        return {"v": self.v, "out": self.out}

    def shapes_at(self, rank: int, heads: int = 1) -> dict[str, tuple[int, int]]:
        return {"v": (self.v.in_features, heads * rank), "out": (heads * rank, self.out.out_features)}

    def parameters_at(self, role: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return _role_parameters(self.names[role], self.modules()[role], weight, bias)


# -- joint attention (MMDiT): one attention over the concatenated tokens of several streams -------------------
#
# Each stream projects its own tokens with its own Linears (SD3: the image stream's to_q/to_k/to_v, the text
# stream's add_q_proj/add_k_proj/add_v_proj), and the attention runs over all tokens at once. Seen from the math,
# that is one self-attention whose tokens live in the direct sum of the streams' input spaces, each stream's
# part with a constant-1 coordinate appended: an image token is (x, 1, 0, 0), a text token (0, 0, y, 1). On that
# space the per-stream projections *with their biases* are one bias-free Linear (:class:`StreamStack`), so the
# closed forms of a plain bias-free self-attention apply unchanged — the biases included, which matters because
# a key bias differs between the streams and no longer cancels in the softmax. The output projections are one
# Linear whose rows are the streams' outputs stacked (:class:`OutputStack`).


def joint_tokens(*streams: torch.Tensor) -> torch.Tensor:
    """(batch, Σ tokens, Σ (channels + 1)): every stream's tokens in the direct sum of the streams' inputs, each
    with its constant-1 coordinate (see above), in the order the joint attention concatenates them."""
    widths = [s.shape[-1] + 1 for s in streams]
    parts = []
    for i, s in enumerate(streams):
        before, after = sum(widths[:i]), sum(widths[i + 1:])
        parts.append(torch.cat([s.new_zeros(*s.shape[:-1], before), s, s.new_ones(*s.shape[:-1], 1),
                                s.new_zeros(*s.shape[:-1], after)], -1))
    return torch.cat(parts, -2)


def joint_moment(*streams: torch.Tensor) -> torch.Tensor:
    """Σ x xᵀ over :func:`joint_tokens` of ``streams``, in float64: block-diagonal (the streams' coordinates never
    share a token), each block the moment of one stream's tokens with their constant-1 coordinate — a quarter of
    the products of the dense moment for two streams of equal width."""
    blocks = []
    for s in streams:
        x = s.reshape(-1, s.shape[-1]).double()
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        blocks.append(x.T @ x)
    return torch.block_diag(*blocks)


@dataclass(frozen=True)
class StreamStack:
    """The Linears of one input role (query, key or value) of a joint attention, one per stream, as one bias-free
    Linear on the direct sum of the streams' inputs with their constant-1 coordinates (:func:`joint_tokens`)."""

    linears: tuple[nn.Linear, ...]
    bias = None

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([torch.cat([lin.weight, _bias_column(lin)], 1) for lin in self.linears], 1)

    @property
    def in_features(self) -> int:
        return sum(lin.in_features + 1 for lin in self.linears)

    @property
    def out_features(self) -> int:
        return self.linears[0].out_features

    def split(self, weight: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each stream's (weight, bias) from a weight on the direct sum (a stream without a bias must get a zero
        bias column: its constant coordinate reaches nothing)."""
        out, start = [], 0
        for lin in self.linears:
            w, b = weight[:, start:start + lin.in_features], weight[:, start + lin.in_features]
            if lin.bias is None and b.abs().max() > 0:
                raise SlimDiffError("a joint-attention stream without a bias was given one")
            out.append((w.contiguous(), None if lin.bias is None else b.contiguous()))
            start += lin.in_features + 1
        return out


def _bias_column(lin: nn.Linear) -> torch.Tensor:
    return (lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features))[:, None]


@dataclass(frozen=True)
class OutputStack:
    """The output projections of a joint attention, one per stream whose output is used, as one Linear whose
    output rows are theirs stacked (each reads the heads of its own stream's tokens)."""

    linears: tuple[nn.Linear, ...]

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([lin.weight for lin in self.linears], 0)

    @property
    def bias(self) -> torch.Tensor | None:
        if all(lin.bias is None for lin in self.linears):
            return None
        return torch.cat([_bias_column(lin)[:, 0] for lin in self.linears])

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    @property
    def out_features(self) -> int:
        return sum(lin.out_features for lin in self.linears)

    def split(self, weight: torch.Tensor, bias: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out, start = [], 0
        for lin in self.linears:
            rows = slice(start, start + lin.out_features)
            out.append((weight[rows].contiguous(), None if lin.bias is None else bias[rows].contiguous()))
            start += lin.out_features
        return out


@dataclass(frozen=True)
class JointQKLinears(QKLinears):
    """Q·K of a joint attention: ``q`` and ``k`` are :class:`StreamStack` operands for the math; ``names`` maps
    the real Linears' roles (``q``, ``k`` for the first stream, ``q.1``, ``k.1``… for the others) to their paths,
    which :meth:`modules`, :meth:`shapes_at` and :meth:`parameters_at` speak of."""

    def modules(self) -> dict[str, nn.Linear]:
        return {_stream_role(role, i): lin for role, stack in (("q", self.q), ("k", self.k))
                for i, lin in enumerate(stack.linears)}

    def shapes_at(self, rank: int, heads: int = 1) -> dict[str, tuple[int, int]]:
        return {role: (lin.in_features, heads * rank) for role, lin in self.modules().items()}

    def parameters_at(self, role: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        stack = self.q if role == "q" else self.k
        return {k: v for i, (w, b) in enumerate(stack.split(weight))
                for k, v in _parameters(self.names[_stream_role(role, i)], w, b).items()}


@dataclass(frozen=True)
class JointVOLinears(VOLinears):
    """V·O of a joint attention: ``v`` a :class:`StreamStack`, ``out`` an :class:`OutputStack` (roles ``v``, ``v.1``…
    and ``out``, ``out.1``… of the real Linears in ``names``)."""

    def modules(self) -> dict[str, nn.Linear]:
        return {_stream_role(role, i): lin for role, stack in (("v", self.v), ("out", self.out))
                for i, lin in enumerate(stack.linears)}

    def shapes_at(self, rank: int, heads: int = 1) -> dict[str, tuple[int, int]]:
        return {**{_stream_role("v", i): (lin.in_features, heads * rank) for i, lin in enumerate(self.v.linears)},
                **{_stream_role("out", i): (heads * rank, lin.out_features) for i, lin in enumerate(self.out.linears)}}

    def parameters_at(self, role: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        parts = self.v.split(weight) if role == "v" else self.out.split(weight, bias)
        return {k: v for i, (w, b) in enumerate(parts)
                for k, v in _parameters(self.names[_stream_role(role, i)], w, b).items()}


def _stream_role(role: str, stream: int) -> str:
    return role if stream == 0 else f"{role}.{stream}"


SiteLinears = FFNLinears | QKLinears | VOLinears


# ----------------------------------------------------------------------------------------------------------
# Hook points
# ----------------------------------------------------------------------------------------------------------


def hidden_and_context(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The query-side tokens and the key/value-side context of a diffusers ``Attention`` call."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return x, ctx


def context_keep_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """(batch, key tokens) bool — the context tokens a diffusers ``Attention`` call attends to — from its
    ``attention_mask`` (a bool mask, or an additive bias: 0 keep, a large negative number discard, as PixArt's
    transformer passes its text padding mask); None when every token counts. A mask that differs between
    query tokens is no padding mask: refused."""
    mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else mask > -1.0
    if keep.ndim == 3 and keep.shape[1] == 1:
        keep = keep[:, 0]
    if keep.ndim != 2:
        raise SlimDiffError(f"an attention mask of shape {tuple(mask.shape)} is no key padding mask: slimdiff "
                            "calibrates attentions whose masks only drop context tokens")
    return keep


@dataclass(frozen=True)
class SublayerTaps:
    """Where calibration observes one FFN or attention sub-layer of a block.

    * ``residuals``: the forward *input* (first positional argument) of each is a residual stream entering the
      sub-layer (two for a joint attention: the image and the text stream); ``update``: the first
      ``update_streams`` elements of its forward *output* (the output itself if not a tuple) are what the
      sub-layer adds to them.
    * FFN: ``hidden`` is the down projection; its input is the hidden activation h of the FFN.
    * attention: ``attention`` is called with the query tokens and the context (``read_inputs`` extracts both
      from its arguments; context None = self-attention; a joint attention reads its streams' tokens in the direct
      sum, :func:`joint_tokens`); the inputs of ``head_outputs`` hold the ``heads`` concatenated per-head outputs
      z of the tokens whose outputs are used; ``query`` and ``key`` are the projections (a Linear, or a
      :class:`StreamStack`) whose per-head Grams the TRQ of its Q·K site reads (calibration applies their weights
      to the inputs it already sees); ``context_keep`` reads which context tokens the call attends to (padding
      left out of the context's statistics).
    * a :class:`ColumnBlock` stands for a Linear where several sub-layers share one (FLUX's single-stream
      ``proj_out``): as ``hidden`` or in ``head_outputs`` its columns of the shared Linear's input are observed, as
      ``update`` its part of the shared Linear's output.
    * ``gate``: where the block scales the sub-layer's output before adding it to the residual stream (adaLN
      blocks such as PixArt's and SD3's), the scale — one per update stream, a tuple when there are several — as
      a function of the *block's* call arguments; the update energy is that of the gated output.
    """

    sublayer: str  # attribute path inside the block: statistics live under "<block>.<sublayer>"
    kind: str  # FFN, or "attention"
    residuals: tuple[nn.Module, ...]
    update: nn.Module | ColumnBlock
    update_streams: int = 1
    hidden: nn.Linear | ColumnBlock | None = None
    attention: nn.Module | None = None
    head_outputs: tuple[nn.Linear | ColumnBlock, ...] = ()
    query: nn.Linear | StreamStack | None = None
    key: nn.Linear | StreamStack | None = None
    heads: int = 1
    read_inputs: Callable[[tuple, dict], tuple[torch.Tensor, torch.Tensor | None]] = hidden_and_context
    context_keep: Callable[[tuple, dict], torch.Tensor | None] = context_keep_mask
    gate: Callable[[tuple, dict], torch.Tensor | tuple[torch.Tensor, ...]] | None = None
    # the float64 moment Σ x xᵀ of what ``read_inputs`` returns, computed from the call's arguments where the adapter
    # knows a cheaper way than the product of the tokens (a joint attention's is block-diagonal); None: that product
    input_moment: Callable[[tuple, dict], torch.Tensor] | None = None


ATTENTION = "attention"


# ----------------------------------------------------------------------------------------------------------
# The statistics schema: typed records, one key composer
# ----------------------------------------------------------------------------------------------------------


def stat_key(sublayer_path: str, name: str) -> str:
    """The storage key of one statistic of one sub-layer (the on-disk format of ``slimdiff-stats/2``)."""
    return f"{sublayer_path}.{name}"


def _stored(name: str, per_timestep: bool, optional: bool = False):
    """A record field stored under ``<sublayer>.<name>``; ``per_timestep``: a (T, ...) tensor."""
    return field(metadata={"key": name, "per_timestep": per_timestep, "optional": optional})


class _Record:
    """Reading a typed record back from the flat tensor dict of a statistics directory."""

    @classmethod
    def key(cls, sublayer_path: str, field_name: str) -> str:
        """Where the record field ``field_name`` of one sub-layer is stored (the writer's side)."""
        stored = {f.name: f.metadata["key"] for f in fields(cls) if "key" in f.metadata}
        return stat_key(sublayer_path, stored[field_name])

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], sublayer_path: str, **extra):
        values = dict(extra)
        for f in fields(cls):
            if "key" not in f.metadata:
                continue
            key = stat_key(sublayer_path, f.metadata["key"])
            if key in tensors:
                values[f.name] = tensors[key]
            elif f.metadata["optional"]:
                values[f.name] = None
            else:
                raise SlimDiffError(f"statistics have no {key!r}: they were collected for another model "
                                    "or by an older slimdiff")
        return cls(**values)


@dataclass(frozen=True)
class FFNEnergies(_Record):
    """Pass-1 scalars of one FFN, per timestep: Σ‖h‖², Σ‖W_D h‖² and the token count (for the TRQ)."""

    h_energy: torch.Tensor = _stored("h_energy", True)
    hout_energy: torch.Tensor = _stored("hout_energy", True)
    tokens: torch.Tensor = _stored("tokens", True)


@dataclass(frozen=True)
class ResidualEnergies(_Record):
    """Per timestep: energy of the residual stream entering a sub-layer and of the update it adds."""

    res_energy: torch.Tensor = _stored("res_energy", True)
    res_tokens: torch.Tensor = _stored("res_tokens", True)
    upd_energy: torch.Tensor = _stored("upd_energy", True)

    @property
    def propagation(self) -> torch.Tensor:
        """Relative update energy per timestep (the propagation factor of the module score)."""
        return self.upd_energy / self.res_energy


@dataclass(frozen=True)
class FFNStatistics(_Record):
    """Pass-2 statistics of one FFN: its energies, the fidelity-weighted hidden moment Σ̄ (unnormalised, with
    its normaliser) and its residual energies."""

    h_energy: torch.Tensor = _stored("h_energy", True)
    hout_energy: torch.Tensor = _stored("hout_energy", True)
    tokens: torch.Tensor = _stored("tokens", True)
    moment: torch.Tensor = _stored("moment", False)
    moment_norm: torch.Tensor = _stored("moment_norm", False)
    residual: ResidualEnergies | None = None

    @classmethod
    def read(cls, tensors, sublayer_path, **extra):
        return super().read(tensors, sublayer_path, residual=ResidualEnergies.read(tensors, sublayer_path), **extra)

    @property
    def hidden_moment(self) -> torch.Tensor:
        return self.moment / self.moment_norm


@dataclass(frozen=True)
class AttentionGrams(_Record):
    """Per-timestep statistics of one attention that the TRQ reads, small enough to keep for every timestep:
    per-head Grams of its queries q = W_Q x and keys k = W_K y (biases left out, as in the TRQ's operator), of
    its head outputs z (the input of the output projection), and Σ‖x‖². The key side of a cross-attention
    is text, which does not depend on t: one key Gram and one Σ‖y‖² for all timesteps. Collected in both
    passes: pass 1's give the timestep weights, pass 2's (every prompt) the module scores."""

    # the query and key Grams: absent for an attention without a Q·K site (queries and keys normalised per head)
    q_gram: torch.Tensor | None = _stored("q_gram", True, optional=True)
    k_gram: torch.Tensor | None = _stored("k_gram", True, optional=True)  # (H, d, d) for a cross-attention
    input_energy: torch.Tensor = _stored("in_energy", True)
    input_tokens: torch.Tensor = _stored("in_tokens", True)
    z_gram: torch.Tensor = _stored("z_gram", True)
    z_tokens: torch.Tensor = _stored("z_tokens", True)
    z_sum: torch.Tensor | None = _stored("z_sum", True, optional=True)  # (T, H·d) Σz: centres z on a value bias
    context_energy: torch.Tensor | None = _stored("ctx_energy", False, optional=True)
    context_tokens: torch.Tensor | None = _stored("ctx_tokens", False, optional=True)

    @property
    def cross(self) -> bool:
        return self.context_energy is not None

    @property
    def query_grams(self) -> torch.Tensor:
        """(T, H, d, d) per-token Gram of each head's queries per timestep."""
        return _per_token(self.q_gram, self.input_tokens)

    @property
    def key_grams(self) -> torch.Tensor:
        """(T, H, d, d) per-token Gram of each head's keys per timestep; (H, d, d) for a cross-attention."""
        return self.k_gram / self.context_tokens if self.cross else _per_token(self.k_gram, self.input_tokens)

    @property
    def input_traces(self) -> torch.Tensor:
        """(T,) E‖x‖² per token of the query-side input."""
        return self.input_energy / self.input_tokens

    @property
    def key_input_traces(self) -> torch.Tensor:
        """E‖y‖² per token of the key-side input: (T,) for self-attention, a scalar for cross-attention."""
        return self.context_energy / self.context_tokens if self.cross else self.input_traces

    @property
    def output_grams(self) -> torch.Tensor:
        """(T, H, d, d) per-token Gram of each head's output per timestep."""
        return _per_token(self.z_gram, self.z_tokens)

    def output_grams_less(self, bias: torch.Tensor) -> torch.Tensor:
        """(T, H, d, d) per-token Gram of each head's output less ``bias`` (H·d,), the value bias a slim attention
        folds into its output bias: E[(z−b)(z−b)ᵀ] = E[zzᵀ] − bE[z]ᵀ − E[z]bᵀ + bbᵀ."""
        if self.z_sum is None:
            raise SlimDiffError("these statistics lack the head-output sums a value projection with a bias needs: "
                                "calibrate again")
        heads = self.z_gram.shape[-3]
        mean = _per_token(self.z_sum, self.z_tokens).reshape(-1, heads, self.z_gram.shape[-1])
        b = bias.to(mean).reshape(heads, -1)
        cross = torch.einsum("hd,the->thde", b, mean)
        return self.output_grams - cross - cross.mT + torch.einsum("hd,he->hde", b, b)


# The denoiser's own text context (what :meth:`DenoiserFamily.text_context` returns) is stored under this prefix.
TEXT_CONTEXT = "text_context"


@dataclass(frozen=True)
class TextContextMoment(_Record):
    """The token moment of the text context a denoiser call passes to its cross-attentions, summed once per
    call — shared by every cross-attention that reads that tensor unchanged."""

    moment: torch.Tensor = _stored("moment", False)
    tokens: torch.Tensor = _stored("tokens", False)


@dataclass(frozen=True)
class AttentionStatistics(_Record):
    """Pass-2 statistics of one attention: its per-timestep Grams (:class:`AttentionGrams`), the input moments the
    decompositions need, already fidelity-weighted over timesteps (Σ̄x = Σ_t w_t Σx_t with the Q·K site's weights
    from pass 1 and, for a self-attention, once more with the V·O site's weights, as the FFNs' moment — one C×C
    matrix each instead of one per timestep), the context moment Σy of a cross-attention (text tokens do not
    depend on t; its own, or the denoiser's shared :class:`TextContextMoment`), token counts per sample (``seq``,
    ``context_seq``) and its residual energies."""

    # absent for an attention without a Q·K site (queries and keys normalised per head: qk_norm)
    qk_moment: torch.Tensor | None = _stored("qk_moment", False, optional=True)
    qk_moment_norm: torch.Tensor | None = _stored("qk_moment_norm", False, optional=True)
    # Σ w x with the same weights: the mean a query projection with a bias needs (statistics from before it was
    # collected lack it; they serve models without one)
    qk_sum: torch.Tensor | None = _stored("qk_sum", False, optional=True)
    vo_moment: torch.Tensor | None = _stored("vo_moment", False, optional=True)
    vo_moment_norm: torch.Tensor | None = _stored("vo_moment_norm", False, optional=True)
    context: torch.Tensor | None = _stored("ctx", False, optional=True)
    context_norm: torch.Tensor | None = None  # the tokens ``context`` sums over
    grams: AttentionGrams | None = None
    seq: int = 0
    context_seq: int | None = None
    residual: ResidualEnergies | None = None

    @classmethod
    def read(cls, tensors, sublayer_path, **extra):
        if seq_key(sublayer_path) not in tensors:
            raise SlimDiffError(f"statistics have no {seq_key(sublayer_path)!r}: they were collected for another "
                                "model or by an older slimdiff")
        ctx_seq = tensors.get(seq_key(sublayer_path, context=True))
        grams = AttentionGrams.read(tensors, sublayer_path)
        stats = super().read(tensors, sublayer_path, grams=grams, residual=ResidualEnergies.read(tensors, sublayer_path),
                             seq=int(tensors[seq_key(sublayer_path)]),
                             context_seq=int(ctx_seq) if ctx_seq is not None else None, **extra)
        if not grams.cross:
            return stats
        if stats.context is not None:
            return replace(stats, context_norm=grams.context_tokens)
        shared = TextContextMoment.read(tensors, TEXT_CONTEXT)
        return replace(stats, context=shared.moment, context_norm=shared.tokens)

    @property
    def qk_input_moment(self) -> torch.Tensor:
        """Σ̄x weighted with the Q·K site's timestep weights (per token)."""
        return self.qk_moment / self.qk_moment_norm

    @property
    def qk_input_mean(self) -> torch.Tensor | None:
        """E[x] with the Q·K site's timestep weights (None in statistics collected without it)."""
        return None if self.qk_sum is None else self.qk_sum / self.qk_moment_norm

    @property
    def vo_input_moment(self) -> torch.Tensor:
        """The value-side input moment weighted with the V·O site's timestep weights: Σ̄x of a self-attention,
        the (timestep-free) text moment of a cross-attention."""
        return self.context_moment if self.context is not None else self.vo_moment / self.vo_moment_norm

    @property
    def context_moment(self) -> torch.Tensor | None:
        return None if self.context is None else self.context / self.context_norm

    @property
    def key_tokens(self) -> int:
        """Key/value tokens per sample: the context's for cross-attention, the query's for self-attention."""
        return self.seq if self.context_seq is None else self.context_seq


# Tokens per sample seen by an attention (and by its context) are stored as "<key>.seq" scalars.
SEQ = "seq"


def seq_key(sublayer_path: str, context: bool = False) -> str:
    """Storage key of the tokens per sample of an attention's queries (or, ``context``, of its keys/values)."""
    return stat_key(stat_key(sublayer_path, "ctx") if context else sublayer_path, SEQ)


def _per_token(sums: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return sums / tokens.reshape(-1, *([1] * (sums.ndim - 1)))


# ----------------------------------------------------------------------------------------------------------
# The two adapter contracts
# ----------------------------------------------------------------------------------------------------------


class BlockAdapter(ABC):
    """Everything slimdiff needs to know about one transformer-block class (stateless; one instance per class).

    A new block type (e.g. SD3's ``JointTransformerBlock``) is one subclass registered in :data:`BLOCKS`:
    :meth:`sites` lists and validates its compressible groups, :meth:`linears` / :meth:`set_linear` read and
    replace their weights, :meth:`taps` names the hook points of each sub-layer, :meth:`unit_macs` prices a
    unit of rank, and :meth:`prepare_attention` makes an attention compute with independent q·k / v widths.
    A Linear that several sites share by column blocks (FLUX's single-stream ``proj_out``) is declared by
    :meth:`column_blocks`.
    """

    @abstractmethod
    def sites(self, path: str, block: nn.Module) -> list[ModuleSite]:
        """The block's compressible sites in forward order; a :class:`SlimDiffError` naming the module for any
        sub-layer slimdiff cannot slim (better than a wrong result)."""

    @abstractmethod
    def linears(self, block: nn.Module, site: ModuleSite) -> SiteLinears:
        """The Linears of ``site`` inside ``block`` (roles and module paths)."""

    @abstractmethod
    def set_linear(self, block: nn.Module, site: ModuleSite, role: str, linear: nn.Linear) -> None:
        """Replace the Linear playing ``role`` (a key of ``linears(...).names``) of ``site``."""

    @abstractmethod
    def prepare_attention(self, block: nn.Module, site: ModuleSite) -> None:
        """Make ``site``'s attention compute correctly once its q·k and v head widths differ from the original
        (keeping the original softmax scale)."""

    @abstractmethod
    def taps(self, block: nn.Module) -> list[SublayerTaps]:
        """Hook points of every FFN and attention sub-layer of the block, in forward order."""

    @abstractmethod
    def unit_macs(self, block: nn.Module, site: ModuleSite, tokens: Callable[[str], tuple[int, int]]) -> int:
        """MACs per sample per denoiser call removed when ``site``'s rank drops by one. ``tokens(sublayer)``
        gives (query tokens, key/value tokens) per sample seen by an attention sub-layer of this block."""

    def column_blocks(self, block: nn.Module) -> dict[str, tuple[int, ...]]:
        """The Linears of the block that several sites share, by path inside the block, each with the widths of
        its input-column blocks as the block's current sites give them (:class:`ColumnBlock`); none by default."""
        return {}


class TextTower(NamedTuple):
    """A text encoder of a pipeline with its tokenizer (unpacks as ``tokenizer, encoder``); SlimSet embeds
    prompts with every tower's pooled output."""

    tokenizer: Any
    encoder: nn.Module


#: Outputs a served text encoder can return, named as the pipelines read them off a transformers output.
LAST_HIDDEN_STATE = "last_hidden_state"
PENULTIMATE_HIDDEN_STATE = "penultimate_hidden_state"  # hidden_states[-2]
TEXT_EMBEDS = "text_embeds"
POOLER_OUTPUT = "pooler_output"  # the pooled output of a CLIPTextModel, without projection (FLUX's CLIP-L)


@dataclass(frozen=True)
class ServedTextEncoder:
    """A text encoder as a Triton repository serves it: a model named after its pipeline attribute (``text_encoder``,
    ``text_encoder_2``) that takes ``input_ids`` (tokenized by the pipeline attribute ``tokenizer``) — and the
    tokenizer's ``attention_mask`` too when the pipeline passes it (PixArt's T5) — and returns ``outputs``:
    :data:`LAST_HIDDEN_STATE` (after the final layer norm: SD-1.x/2.x, T5), :data:`PENULTIMATE_HIDDEN_STATE`
    (``hidden_states[-2]``: SDXL, SD3's CLIPs), :data:`TEXT_EMBEDS` (the projected pooled output of a
    ``CLIPTextModelWithProjection``) and :data:`POOLER_OUTPUT` (a ``CLIPTextModel``'s pooled output: FLUX's CLIP-L).
    ``tokens``: the one prompt length the pipeline pads to for this encoder (its
    engine is built for it); None: the export's text length range, capped at the encoder's positions."""

    name: str
    tokenizer: str
    outputs: tuple[str, ...]
    attention_mask: bool = False
    tokens: int | None = None


def pipeline_call_default(pipe: Any, argument: str) -> Any:
    """The default of ``argument`` in ``pipe``'s ``__call__`` (what a served pipeline called without it uses: PixArt's
    and SD3's ``max_sequence_length``)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get(argument)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise SlimDiffError(f"{type(pipe).__name__}.__call__ has no default {argument}")
    return parameter.default


MODEL_DTYPE = "model"  # a tensor whose dtype follows the denoiser's precision (fp32 / fp16)


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by the image's seed. It draws the image's initial latent first
    (:meth:`DenoiserFamily.seeded_latents`); passed on to the pipeline (``generator=``) it then draws whatever else
    the pipeline draws for that image — a consistency or ancestral sampler's fresh noise at every step, an inpainting
    pipeline's sample of the masked image's latent — so images do not depend on batching, device or the global RNG,
    and no draw repeats the initial latent's."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def starting_latents(strength: float, draw: Callable[[], torch.Tensor]) -> dict:
    """``{"latents": draw()}`` when a call at ``strength`` starts from pure noise (1.0), else nothing: an image
    pipeline given ``latents`` takes them as its start whatever the strength (diffusers' inpainting pipelines, FLUX
    Fill's), so below 1 the pipeline must noise the image itself — with each image's generator
    (:func:`image_generators`), still batch-independent."""
    return {"latents": draw()} if strength >= 1.0 else {}


@dataclass(frozen=True)
class ConditionInput:
    """A conditioning tensor the pipeline passes beyond (sample, timestep, encoder_hidden_states) — an
    ``added_cond_kwargs`` entry of that name, or with ``keyword`` the denoiser call's keyword argument of that name
    (an LCM UNet's ``timestep_cond``) — and an input of that name in exported graphs and engines.

    ``dims`` holds fixed sizes and the axis name ``"batch"``; ``dtype`` is :data:`MODEL_DTYPE` or a torch dtype
    name. Parity checks draw it from U[0, ``high``) when ``high`` is set, from N(0, 1) otherwise.
    """

    name: str
    dims: tuple
    dtype: str
    high: float = 0.0
    keyword: bool = False


def downsampled_axis(axis: str, factor: int) -> str:
    """An :class:`ExportInput` dim: the latent ``axis`` divided by ``factor`` (a UNet's feature map at level k:
    ``factor`` 2^k; the axis itself for 1). Engines keep ``axis`` a multiple of ``factor``, so the size is exact;
    exporters and engines read it with :func:`slimdiff.export.shapes.split_axis`."""
    return axis if factor == 1 else f"{axis}/{factor}"


#: An export option (:attr:`DenoiserFamily.export_options`): a UNet that also takes ControlNet residuals, the
#: ``down_block_additional_residuals`` and ``mid_block_additional_residual`` a ControlNet pipeline passes.
CONTROLNET_RESIDUALS = "controlnet"


# How parity checks draw an exported input: N(0, 1) (U[0, high) when ``high`` is set, token ids below it for int64);
# a timestep in [0, 1000); a flow-matching sigma in [0, 1) (FLUX's transformer takes its timestep so); a key padding
# mask (1 keep, 0 padding) that keeps each sample's first k tokens, k drawn below the token count (so some padding is
# masked).
NORMAL, TIMESTEP, SIGMA, KEEP_MASK = "normal", "timestep", "sigma", "keep_mask"


#: Axes of a second latent an exported denoiser takes beside the latent (FLUX Kontext's reference image), each with the
#: latent axis whose range it shares (:mod:`slimdiff.export.shapes`): an engine serves references of any size the
#: latent's ranges allow, with no shape flags of their own.
REFERENCE_HEIGHT, REFERENCE_WIDTH = "reference_height", "reference_width"
PAIRED_AXES = {REFERENCE_HEIGHT: "height", REFERENCE_WIDTH: "width"}


@dataclass(frozen=True)
class ExportInput:
    """One positional input of an exported component (the denoiser's come from :meth:`DenoiserFamily.export_inputs`):
    its name in graphs and engines, ``dims`` (fixed sizes and the axis names ``batch``, ``height``, ``width``,
    ``text_len`` and those of :data:`PAIRED_AXES`; a latent axis down-sampled: :func:`downsampled_axis`), ``dtype``
    (:data:`MODEL_DTYPE` or a torch dtype name), and how parity checks draw it (``draw``; ``high``: the bound of
    uniform draws and int64 token ids)."""

    name: str
    dims: tuple
    dtype: str
    high: float = 0.0
    draw: str = NORMAL


class DenoiserFamily(ABC):
    """Everything slimdiff needs to know about one kind of denoiser and its pipeline.

    Registered in :data:`FAMILIES` under the pipeline and denoiser classes it serves; :meth:`accepts` refines
    the match where one class serves several families (SD and SDXL both use ``UNet2DConditionModel``).
    """

    name: str  # short family name recorded in plans and reports ("sd", "sdxl", ...)
    text_tokens: int = 77  # text tokens of a denoiser call when none are given (CLIP's 77; PixArt-Σ's T5: 300)

    def accepts(self, obj: Any) -> bool:
        """Whether this family serves ``obj`` (a pipeline or a denoiser of a registered class)."""
        return True

    #: The pipeline attribute holding the denoiser; also the name of its exported graph and engine files
    #: (``unet.onnx``, ``transformer.engine.json``).
    component: str = "unet"

    def denoiser(self, pipe: Any) -> nn.Module:
        """The denoiser of ``pipe`` (``pipe.unet`` for UNet pipelines, ``pipe.transformer`` for DiTs)."""
        return getattr(pipe, self.component)

    @abstractmethod
    def build(self, config: dict) -> nn.Module:
        """The dense denoiser of ``config`` (uninitialised; build under ``torch.device("meta")`` when only
        shapes are needed: MAC counts, geometry)."""

    @abstractmethod
    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The timestep argument of one denoiser call (calibration indexes its statistics by it)."""

    #: Whether the cross-attentions read the tensor :meth:`text_context` returns unchanged (statistics size
    #: estimates count one shared text moment then, one per cross-attention otherwise).
    shares_text_context: bool = True

    def kept_prediction(self, kwargs: dict, prediction: torch.Tensor) -> torch.Tensor:
        """The part of one denoiser call's ``prediction`` (its keyword arguments ``kwargs``) the pipeline keeps: all
        of it, but for FLUX Kontext's reference-image tokens."""
        return prediction

    @abstractmethod
    def text_context(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The text tokens one denoiser call passes on to its cross-attentions, or None when they see another
        tensor (a projection inside the denoiser). Calibration keeps a single moment of them for every
        cross-attention that reads this very tensor (all of them in SD and SDXL UNets: 70 identical 2048×2048
        moments in SDXL otherwise)."""

    @abstractmethod
    def dummy_call(self, config: Any, batch: int, latent: tuple[int, int], text_tokens: int | None = None, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        """Keyword arguments of one denoiser call on zeros of the given sizes, for a denoiser of ``config``
        (MAC counting, geometry, timing; the family's extra conditioning inputs included; any device, meta
        too): ``denoiser(**call)``. ``text_tokens`` None: the family's :attr:`text_tokens`."""

    def check_sampling(self, pipe: Any) -> None:
        """One line for a pipeline whose sampling slimdiff cannot drive — calibration, the measuring runs of
        ``slimdiff eval`` and the timed calls of ``slimdiff bench`` all run it; none by default."""

    @abstractmethod
    def calibration_loop(self, pipe: Any, config: Any) -> Callable[[Sequence[str], Sequence[int]], None]:
        """``loop(prompts, seeds)``: the pipeline's own sampling for one batch of prompts, one seeded
        generator per prompt (``config``: a :class:`slimdiff.calibrate.CalibrationConfig`)."""

    def base_calibration_loop(self, pipe: Any, config: Any, load_base: Callable[[], Any]
                              ) -> Callable[[Sequence[str], Sequence[int]], None]:
        """``loop(prompts, seeds)`` of a model that refines another's latents, calibrated on them: the base model
        (``config.base``, loaded by ``load_base()`` once the cheap checks have passed) samples each batch, this one
        refines its latents. One line for a family that refines no base's latents."""
        raise SlimDiffError(f"a base model given (--base), but {type(pipe).__name__} is no refiner: only the SDXL "
                            "refiner is calibrated on a base model's latents")

    @abstractmethod
    def text_towers(self, pipe: Any) -> list[TextTower]:
        """The pipeline's text encoders with their tokenizers, in the pipeline's order."""

    def condition_zeros(self, config: Any, batch: int, device: str | torch.device, dtype: torch.dtype) -> dict:
        """Zeros for :meth:`condition_inputs`, by name (a dummy call's: :meth:`condition_call`)."""
        return {c.name: torch.zeros(tuple(batch if d == "batch" else d for d in c.dims), device=device,
                                    dtype=dtype if c.dtype == MODEL_DTYPE else getattr(torch, c.dtype))
                for c in self.condition_inputs(config)}

    def condition_call(self, config: Any, values: dict[str, torch.Tensor]) -> dict:
        """The keyword arguments of a denoiser call passing ``values`` (tensors of :meth:`condition_inputs` by name):
        each keyword condition as itself, the others in ``added_cond_kwargs`` (left out when there are none)."""
        conditions = self.condition_inputs(config)
        call = {c.name: values[c.name] for c in conditions if c.keyword}
        added = {c.name: values[c.name] for c in conditions if not c.keyword}
        return {**call, "added_cond_kwargs": added} if added else call

    def condition_inputs(self, config: Any) -> tuple[ConditionInput, ...]:
        """The extra conditioning inputs of the denoiser call (an LCM UNet's ``timestep_cond``; SDXL's
        ``text_embeds``, ``time_ids``), in the order exported graphs take them after (sample, timestep,
        encoder_hidden_states)."""
        return ()

    # -- export: the denoiser as a component with fixed positional inputs ---------------------------------

    #: Axes an exported denoiser keeps at one size (each engine is built for one value of them).
    static_axes: tuple[str, ...] = ()

    #: Optional groups of inputs this family's engines can be built with beyond the pipeline's plain call
    #: (:data:`CONTROLNET_RESIDUALS`), and the groups this instance exports (see :meth:`with_export_options`).
    export_options: tuple[str, ...] = ()
    exporting: frozenset[str] = frozenset()

    def with_export_options(self, options: Collection[str]) -> DenoiserFamily:
        """This family exporting the optional input groups ``options`` too (a copy: the registered adapter stays as
        it is): its :meth:`export_inputs` and :meth:`export_call` then take them. One line for a group the family
        has not."""
        unknown = sorted(set(options) - set(self.export_options))
        if unknown:
            raise SlimDiffError(f"{self.name} denoisers cannot be exported with {', '.join(unknown)} inputs "
                                f"(this family offers {', '.join(self.export_options) or 'none'})")
        if not options:
            return self
        variant = copy.copy(self)
        variant.exporting = frozenset(options)
        return variant

    def calling(self, pipe: Any) -> DenoiserFamily:
        """This family as ``pipe`` calls its denoiser, where the pipeline's other models decide the call (a FLUX
        ControlNet pipeline's samples, as many as its ControlNet gives: :meth:`with_export_options`); itself by
        default. What ``slimdiff bench`` times and builds engines of."""
        return self

    def controlnet_export_option(self, controlnet: Callable[[], Any]) -> str:
        """The export option of engines that also take a ControlNet's outputs (``slimdiff-export
        --controlnet-inputs``): :data:`CONTROLNET_RESIDUALS`, inputs laid out as the denoiser's own skip connections.
        ``controlnet()`` gives the ControlNet the engines serve (None without one), for a family whose inputs follow
        the ControlNet's layout instead (FLUX's block samples)."""
        return CONTROLNET_RESIDUALS

    def export_inputs(self, config: Any) -> tuple[ExportInput, ...]:
        """The denoiser's exported inputs, in the order :meth:`export_call` takes them."""
        raise SlimDiffError(f"the {self.name!r} family declares no export inputs: its denoiser cannot be exported")

    def export_call(self, denoiser: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for the positional ``inputs`` of :meth:`export_inputs` (what exported graphs and
        engines compute)."""
        raise SlimDiffError(f"the {self.name!r} family declares no export call: its denoiser cannot be exported")

    def export_limits(self, config: Any) -> dict[str, tuple[int, str]]:
        """Axis maxima an exported denoiser cannot serve beyond, each with the reason (``slimdiff-export`` refuses a
        range past one before any work): none by default."""
        return {}

    def default_text_len(self, pipe: Any) -> str:
        """The ``--text-len`` range engines of this family are built for when none is given (MIN:OPT:MAX)."""
        return "77:77:154"

    # -- measuring: what ``slimdiff bench`` times the denoiser on ------------------------------------------

    #: Options the pipeline's call needs beyond prompt, steps, guidance, size and generator (calibration, the
    #: benchmark's end-to-end runs and evaluation all pass them).
    pipeline_options: dict = {}

    #: Whether measuring calls start from seeded latents (``latents=``, :meth:`seeded_latents`); not where the
    #: start is an image the pipeline noises (an image-to-image family).
    measures_from_latents: bool = True

    def sized_options(self, height: int, width: int) -> dict:
        """What a pipeline call drawing a ``height`` × ``width`` px image passes beside ``height`` and ``width``
        (measuring runs, served requests): nothing, but FLUX Kontext's ``max_area`` (its pipeline would scale the
        image to 1 MP)."""
        return {}

    def measuring_call(self, height: int, width: int, images: Sequence | None = None,
                       seeds: Sequence[int] = ()) -> dict:
        """The arguments of a pipeline call of the benchmark's end-to-end runs and of evaluation that fix what it
        draws, beyond prompt, steps, guidance, generator and latents: the image size and :attr:`pipeline_options`.
        ``images``: for a family whose pipeline takes an image (:attr:`serving_image_inputs`: inpainting, the SDXL
        refiner, FLUX Control's control image), one PIL image per image drawn — ``seeds`` its seeds — instead of the family's synthetic one
        (``slimdiff eval --images``); other families take none."""
        return {"height": height, "width": width, **self.pipeline_options}

    def guided_rows_per_image(self, config: Any) -> int:
        """Rows of the batch a denoiser of ``config`` sees per image in a guided pipeline call: 2 under
        classifier-free guidance (the unconditional and the conditional prediction), 1 where the guidance scale is
        an input of the denoiser (FLUX.1-dev, LCM UNets). The benchmark's end-to-end runs sample batch / rows
        images, so the denoiser sees the batch it was timed at."""
        return 2

    def sample_size(self, config: Any) -> tuple[int, int]:
        """The latent (height, width) the pipeline samples at when no image size is given: the denoiser config's
        ``sample_size``."""
        size = config["sample_size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    def seeded_latents(self, config: Any, latent: tuple[int, int], generators: Sequence[torch.Generator]
                       ) -> torch.Tensor:
        """Initial latents of a pipeline call in the layout the pipeline takes them (``latents=``), one image per
        generator (:func:`image_generators`) on a ``latent`` = (height, width) grid, each drawn by its image's
        generator (so an image does not depend on batching or device): (images, channels, height, width), float32
        on the CPU."""
        return torch.cat([torch.randn((1, config["in_channels"], *latent), generator=g) for g in generators])

    def exported_from_call(self, call: dict[str, Any]) -> tuple[dict[str, Any], Callable[[torch.Tensor], torch.Tensor]]:
        """One call the pipeline makes to its denoiser (``call``: its arguments by name, ``added_cond_kwargs``
        unfolded) as the exported inputs by name (:meth:`export_inputs`), with the function that turns the exported
        call's output into the denoiser's prediction: the call's own arguments and output by default."""
        return call, lambda out: out

    def latent_multiple(self, config: Any) -> int:
        """What the latent height and width must be multiples of for the denoiser to run (a UNet's down-sampling
        levels, a DiT's patch size)."""
        return 1

    def check_image_size(self, pipe: Any, height: int | None, width: int | None) -> None:
        """One line, before any work, for an image size (px; None: the pipeline's default) the denoiser cannot be
        sampled, exported or timed at: sizes are positive multiples of the VAE scale × :meth:`latent_multiple`
        (diffusers' pipelines check only the VAE scale, and only once they sample)."""
        vae = pipe.vae_scale_factor
        latent = self.latent_multiple(self.denoiser(pipe).config)
        for axis, size in (("height", height), ("width", width)):
            if size is not None and (size <= 0 or size % (vae * latent)):
                raise SlimDiffError(f"image {axis} {size} px: {type(pipe).__name__} takes positive multiples of "
                                    f"{vae * latent} px (VAE scale {vae} × latent multiple {latent})")

    def prompt_inputs(self, pipe: Any, prompt: str, size: tuple[int, int], device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
        """The exported inputs (named as in :meth:`export_inputs`) of one denoiser call of ``pipe`` for ``prompt``
        at an image of ``size`` = (height, width) px, for one image without guidance, as the pipeline makes them —
        every input but the latent and the timestep: the text conditioning and any extra conditions."""
        raise SlimDiffError(f"the {self.name!r} family declares no prompt inputs: slimdiff bench cannot drive it")

    # -- serving: the ``pipeline`` model of a Triton repository (slimdiff.engines.triton) --------------------

    #: The diffusers pipeline class a Triton repository's ``pipeline`` model runs for this family, its text encoders,
    #: UNet / transformer and VAE decoder replaced by calls to the repository's models; None: not served yet.
    serving_pipeline: str | None = None

    #: The images a request to the served pipeline carries beside the prompt (inpainting: ``image`` and
    #: ``mask_image``).
    serving_image_inputs: tuple[str, ...] = ()

    @property
    def noises_image(self) -> bool:
        """Whether the pipeline starts from a request's ``image`` noised to a strength (inpainting, the refiner), not
        from noise conditioned on its images (FLUX Control's control image, FLUX Kontext's reference ``image``)."""
        return "image" in self.serving_image_inputs

    #: The request images the pipeline passes through the VAE's encoder (a VAE encoder is served when a request
    #: carries one): the image it starts from or paints in; FLUX Control's conditioning image too.
    serving_encoded_images: tuple[str, ...] = ("image",)

    #: The diffusers pipeline class a repository runs when it serves a ControlNet beside the denoiser (its requests
    #: carry the conditioning image); None: no ControlNet served for this family.
    serving_controlnet_pipeline: str | None = None

    #: The diffusers image-to-image pipeline class a repository also runs, for requests carrying an image, when
    #: written with ``--triton-img2img`` (it shares the text-to-image pipeline's models; a VAE encoder is served
    #: too); None: no image-to-image requests for this family.
    serving_img2img_pipeline: str | None = None

    #: The same beside :attr:`serving_controlnet_pipeline`: image-to-image with a ControlNet (a request carries its
    #: starting image and the conditioning image).
    serving_controlnet_img2img_pipeline: str | None = None

    #: The family (:attr:`name`) whose pipeline a repository may run after this family's text-to-image one, on its
    #: latents (``--refiner``: SDXL's ensemble of expert denoisers, the base's high-noise steps, then the refiner's);
    #: None: no refiner for this family.
    serving_refiner_family: str | None = None

    #: Whether the family's pipelines run a VAE whose config sets ``force_upcast`` in float32 when the rest runs in
    #: float16 (SDXL's pipelines do: its VAE's float16 activations overflow); its served VAE engines do the same.
    upcasts_vae: bool = False

    def served_text_encoders(self, pipe: Any) -> tuple[ServedTextEncoder, ...]:
        """The text encoders the repository serves, in the pipeline's order, with what the pipeline reads of each."""
        return ()

    def serving_options(self, pipe: Any) -> dict:
        """Keyword arguments of :attr:`serving_pipeline`'s constructor beyond its models, tokenizers and scheduler
        (JSON values, read off ``pipe``)."""
        return {}


class ControlNetAdapter(ABC):
    """What slimdiff knows of one kind of ControlNet (a diffusers ControlNet class): whether one was made for a
    denoiser, and its engine — the inputs it takes, the outputs a denoiser engine built with ``--controlnet-inputs``
    takes from it, and its call on them at conditioning scale 1 (the engine-backed ControlNet applies the scale
    afterwards, as diffusers' ControlNets do after their networks). Registered in :data:`CONTROLNETS` under its
    class, as families are in :data:`FAMILIES`; the ControlNet's own family (the one registered for its class too)
    gives the denoiser's side."""

    @abstractmethod
    def check_made_for(self, controlnet: Any, denoiser_config: Any, what: str) -> None:
        """One line unless ``controlnet`` (``what`` names it) was made for a denoiser of ``denoiser_config``: the
        outputs it gives and the inputs the pipeline passes it fit."""

    def check_engine(self, controlnet: Any, what: str) -> None:
        """One line for a ControlNet whose engine is not built (yet); none by default."""

    @staticmethod
    def family(controlnet: Any) -> DenoiserFamily:
        """The family registered for ``controlnet``'s class too: the denoiser call it shares."""
        from . import family_for

        return family_for(controlnet)

    @abstractmethod
    def export_inputs(self, controlnet: Any) -> tuple[ExportInput, ...]:
        """The engine's inputs, in the order :meth:`export_call` takes them."""

    @abstractmethod
    def export_outputs(self, controlnet: Any) -> tuple[str, ...]:
        """The engine's outputs: the names of the inputs of a denoiser engine built to take them."""

    @abstractmethod
    def export_call(self, controlnet: Any, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``controlnet`` on the exported inputs, at conditioning scale 1: the exported outputs in order."""


# ----------------------------------------------------------------------------------------------------------
# Registries
# ----------------------------------------------------------------------------------------------------------

A = TypeVar("A")


class Registry(Generic[A]):
    """Adapters keyed by class, ModelOpt-style: ``REGISTRY.register({SomeClass: "name"})(AdapterClass)``.

    Lookup walks the object's MRO (the most specific registered class wins); among adapters registered for
    the same class, the latest registered one whose ``accepts(obj)`` holds wins.
    """

    def __init__(self, what: str):
        self.what = what
        self._by_type: dict[type, list[tuple[str, A]]] = {}

    def register(self, mapping: dict[type, str]) -> Callable[[type], type]:
        def decorate(adapter_cls: type) -> type:
            adapter = adapter_cls()
            for cls, name in mapping.items():
                self._by_type.setdefault(cls, []).append((name, adapter))
            return adapter_cls

        return decorate

    def registered(self) -> dict[type, list[str]]:
        return {cls: [name for name, _ in entries] for cls, entries in self._by_type.items()}

    def _candidates(self, obj: Any) -> Iterator[A]:
        for cls in type(obj).__mro__:
            for _, adapter in reversed(self._by_type.get(cls, [])):
                if getattr(adapter, "accepts", lambda o: True)(obj):
                    yield adapter

    def get(self, obj: Any) -> A | None:
        return next(self._candidates(obj), None)

    def supported(self) -> str:
        return ", ".join(sorted({cls.__name__ for cls in self._by_type}))

    def adapters(self) -> list[A]:
        """Every registered adapter, once each, in registration order."""
        return list({id(a): a for entries in self._by_type.values() for _, a in entries}.values())


BLOCKS: Registry[BlockAdapter] = Registry("transformer block")
FAMILIES: Registry[DenoiserFamily] = Registry("model family")
CONTROLNETS: Registry[ControlNetAdapter] = Registry("ControlNet")
