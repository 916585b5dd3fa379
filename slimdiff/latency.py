"""Latency-budget allocation: predict a denoiser's latency under a rank plan from a measured per-module latency
table, and meet a target speed-up with the least predicted error (``slimdiff slim --speedup``).

The table is measured on the deployment device by the benchmark command (``bench --latency-table``, whose
module holds the measuring side and its method notes); this module only reads it.

**Prediction.** Latency under a rank plan = dense latency − Σ over sub-layers of the saving their ranks buy
on their group's curve (linear interpolation between measured widths; bilinear on the attention grid; linear on
the v widths of an attention without a Q·K site).

**Allocator.** :func:`latency_budget_ranks` meets a target speed-up with the least predicted error. It reuses
:func:`slimdiff.allocate.allocate` — greedy on the closed-form error curves — with each module's cost per unit
of width set to its *latency* saving per unit (the table's slope over its removable range), then searches the
budget (ms) by bisection until the table-predicted speed-up reaches the target. Without calibration the error
curves are a stated proxy: relative error = fraction of the width removed, the same for every module.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
from torch import nn

from .allocate import AllocationItem, allocate
from .errors import SlimDiffError
from .families import ATTENTION, FFN, DenoiserFamily, family_for, module_sites, transformer_blocks

TABLE_FORMAT = "slimdiff-latency-table/1"


# ----------------------------------------------------------------------------------------------------------
# Where each site runs: channels, tokens, context
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    kind: str  # "ffn" | "attn1" | "attn2": the measured sub-layer
    channels: int
    tokens: int  # query tokens per sample
    context_tokens: int  # key/value tokens per sample (= tokens for self-attention and FFN)
    context_dim: int
    heads: int
    width: int  # FFN inner width, or per-head width of the attention (q·k and v share it when dense)

    @property
    def key(self) -> str:
        return (f"{self.kind}:C{self.channels}:L{self.tokens}:Lk{self.context_tokens}:Ck{self.context_dim}"
                f":H{self.heads}:W{self.width}")


def site_geometry(unet: nn.Module, latent: tuple[int, int], text_len: int | None = None,
                  family: DenoiserFamily | None = None) -> dict[str, Geometry]:
    """Geometry of every site of a (dense, meta or real) denoiser, read off one meta-device forward pass as
    ``family`` calls it (default the denoiser's own; FLUX Kontext's pipeline adds the reference image's tokens;
    ``text_len`` None: the family's default text length)."""
    family = family or family_for(unet)
    with torch.device("meta"):
        meta = family.build(cast(dict, unet.config))  # diffusers' FrozenDict
    # sub-layer → (channels, query tokens, context tokens, context width), per sample
    seen: dict[str, tuple[int, int, int, int]] = {}

    def hook(sublayer, read_inputs):
        def record(_module, args, kwargs):
            x, ctx = read_inputs(args, kwargs)
            ctx = x if ctx is None else ctx
            seen[sublayer] = (x.shape[-1], x.shape[-2], ctx.shape[-2], ctx.shape[-1])

        return record

    handles = []
    for path, block, adapter in transformer_blocks(meta):
        for tap in adapter.taps(block):
            # an FFN's input is that of its sub-layer module (FLUX's single-stream MLP: proj_mlp, whose update is a
            # column block of the shared proj_out)
            if tap.kind == ATTENTION:
                assert tap.attention is not None  # an attention tap names its module
                module, read = tap.attention, tap.read_inputs
            else:
                module, read = block.get_submodule(tap.sublayer), _first_input
            handles.append(module.register_forward_pre_hook(hook(f"{path}.{tap.sublayer}", read), with_kwargs=True))
    hooked_meta_forward(meta, family, 1, latent, text_len, handles)
    out = {}
    for site in module_sites(meta):
        channels, lq, lk, ck = seen[site.sublayer_path]
        if site.kind == FFN:
            out[site.name] = Geometry("ffn", channels, lq, lq, channels, 1, site.width)
        else:
            assert site.attn is not None  # an attention site names its attention
            out[site.name] = Geometry(site.attn, channels, lq, lk, ck, site.heads, site.width)
    return out


def hooked_meta_forward(meta: nn.Module, family: DenoiserFamily, batch: int, latent: tuple[int, int],
                        text_len: int | None, handles: list) -> None:
    """One forward pass of the meta-device denoiser ``meta`` as ``family`` calls it, for the hooks whose ``handles``
    are given: they are removed after it, whatever happens."""
    call = family.dummy_call(meta.config, batch, latent, text_len, device="meta")
    try:
        with torch.no_grad():
            meta(**call)
    finally:
        for h in handles:
            h.remove()


def _first_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, None]:
    return (args[0] if args else kwargs["hidden_states"]), None


# ----------------------------------------------------------------------------------------------------------
# Reading a table and predicting
# ----------------------------------------------------------------------------------------------------------


def load_table(path: str | os.PathLike) -> dict:
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SlimDiffError(f"cannot read latency table {str(path)!r}: {exc}") from exc
    if table.get("format") != TABLE_FORMAT:
        raise SlimDiffError(f"{str(path)!r} is not a latency table ({TABLE_FORMAT})")
    return table


def _bracket(ranks: list[int], r: float) -> tuple[int, float]:
    """Index i and weight w with r ≈ (1 − w)·ranks[i] + w·ranks[i+1] (clamped to the measured range)."""
    if len(ranks) == 1 or r <= ranks[0]:
        return 0, 0.0
    for i in range(len(ranks) - 1):
        if r <= ranks[i + 1]:
            return i, (r - ranks[i]) / (ranks[i + 1] - ranks[i])
    return len(ranks) - 2, 1.0


def _interp(ranks: list[int], ms: list[float], r: float) -> float:
    if len(ranks) == 1:
        return ms[0]
    i, w = _bracket(ranks, r)
    return (1 - w) * ms[i] + w * ms[i + 1]


def _interp2(ranks: list[int], ms: list[list[float]], rq: float, rv: float) -> float:
    if len(ranks) == 1:
        return ms[0][0]
    i, wq = _bracket(ranks, rq)
    j, wv = _bracket(ranks, rv)
    return ((1 - wq) * ((1 - wv) * ms[i][j] + wv * ms[i][j + 1])
            + wq * ((1 - wv) * ms[i + 1][j] + wv * ms[i + 1][j + 1]))


class LatencyModel:
    """Predicted UNet latency for any ranks of the table's architecture: the dense UNet's measured latency
    minus what each FFN and attention sub-layer saves at its ranks, read off its group's measurements."""

    def __init__(self, table: dict, unet: nn.Module, latent: tuple[int, int] | None = None,
                 family: DenoiserFamily | None = None):
        latent = tuple(latent or table["latent"])
        if list(latent) != list(table["latent"]):
            raise SlimDiffError(f"the latency table was measured at latent {table['latent']}, not {list(latent)}")
        self.table = table
        self.dense_ms = float(table["dense_unet_ms"])
        groups = {g["key"]: g for g in table["groups"]}
        self.sites = module_sites(unet)
        self.width = {s.name: s.width for s in self.sites}
        # the table prices the call it was measured on: that of the family calling ``unet`` (default the denoiser's
        # own; a FLUX Kontext pipeline's adds the reference image's tokens). Tables from before the field: unchecked
        family = family or family_for(unet)
        if table.get("family", family.name) != family.name:
            raise SlimDiffError(f"the latency table was measured on a {table['family']} model's call, not a "
                                f"{family.name} model's: measure one for this model (`slimdiff bench --latency-table`)")
        geometry = site_geometry(unet, latent, table["text_len"], family)
        # One entry per sub-layer: (FFN site,) or (QK site, VO site) of one attention.
        self.layers: dict[str, tuple[dict, tuple[str, ...]]] = {}
        for s in self.sites:
            g = groups.get(geometry[s.name].key)
            if g is None:
                raise SlimDiffError(f"the latency table has no entry for {s.name} ({geometry[s.name].key}); "
                                    "measure a table for this architecture")
            layer = s.sublayer_path
            curves = g["curves"]
            # an attention with a Q·K site has the q·k × v grid; one whose q·k is normalised per head, its v curve
            curve = curves["ffn"] if s.kind == FFN else curves.get("attention") or curves["attention_vo"]
            names = self.layers.get(layer, (curve, ()))[1] + (s.name,)
            self.layers[layer] = (curve, names)

    def _layer_ms(self, curve: dict, names: tuple[str, ...], ranks: dict[str, int]) -> float:
        r = [ranks.get(n, self.width[n]) for n in names]
        if len(names) == 1:
            return _interp(curve["ranks"], curve["ms"], r[0])
        qk, vo = (r[0], r[1]) if names[0].endswith(".qk") else (r[1], r[0])
        return _interp2(curve["ranks"], curve["ms"], qk, vo)

    def saving_ms(self, name: str, rank: int) -> float:
        """Latency saved by reducing one site to ``rank`` with every other site dense."""
        for curve, names in self.layers.values():
            if name in names:
                full = {n: self.width[n] for n in names}
                return self._layer_ms(curve, names, full) - self._layer_ms(curve, names, {**full, name: rank})
        raise SlimDiffError(f"unknown module {name!r}")

    def predict_ms(self, ranks: dict[str, int]) -> float:
        saved = 0.0
        for curve, names in self.layers.values():
            full = {n: self.width[n] for n in names}
            saved += self._layer_ms(curve, names, full) - self._layer_ms(curve, names, ranks)
        return self.dense_ms - saved

    def predict_speedup(self, ranks: dict[str, int]) -> float:
        return self.dense_ms / self.predict_ms(ranks)


# ----------------------------------------------------------------------------------------------------------
# The latency-budget allocator
# ----------------------------------------------------------------------------------------------------------


def proxy_items(unet: nn.Module) -> list:
    """Allocation items without calibration: uniform scores and the error proxy 'relative error = fraction of
    the width removed' for every module (states no preference between modules beyond their cost)."""
    return [AllocationItem(s.name, s.width, 1.0, 0.0,
                           torch.linspace(1.0, 0.0, s.width + 1, dtype=torch.float64))
            for s in module_sites(unet)]


def latency_budget_ranks(items: list, model: LatencyModel, target_speedup: float, *, r_min: int = 8,
                         align: int = 8, temperature: float = math.inf, tolerance: float = 1e-3) -> tuple[dict, dict]:
    """Ranks meeting ``target_speedup`` (table-predicted, over the table's dense latency) with the least
    predicted error: :func:`slimdiff.allocate.allocate` (greedy on ``items``' error curves, weighted by their
    scores at ``temperature``) with costs in milliseconds of latency saved, budget found by bisection.

    Returns ``(ranks, info)``; raises :class:`SlimDiffError` when even the smallest ranks miss the target.
    """
    if target_speedup <= 1:
        raise SlimDiffError(f"target speed-up must exceed 1, got {target_speedup}")
    costs = []
    for item in items:
        floor = min(item.width, r_min)
        saving = model.saving_ms(item.name, floor) / max(1, item.width - floor)
        # A module whose measured saving is nil gets a negligible positive cost: greedy then takes its steps
        # only after every module that buys time.
        costs.append(replace(item, unit_cost=max(saving, 1e-9)))
    removable = sum(c.unit_cost * (c.width - min(c.width, r_min)) for c in costs)

    def ranks_at(budget_ms: float) -> dict[str, int]:
        return allocate(costs, budget_ms, temperature=temperature, r_min=r_min, align=align, method="greedy")

    hi = removable * (1 - 1e-9)
    best = ranks_at(hi)
    ceiling, floor_ms = model.predict_speedup(best), model.predict_ms(best)
    if ceiling < target_speedup:
        raise SlimDiffError(f"target speed-up {target_speedup:.3f} is out of reach: the smallest ranks are "
                            f"predicted at {ceiling:.3f}×")
    lo = 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ranks = ranks_at(mid) if mid > 0 else {c.name: c.width for c in costs}
        if model.predict_speedup(ranks) >= target_speedup:
            hi, best = mid, ranks
        else:
            lo = mid
        if hi - lo <= tolerance * removable:
            break
    # How deep the plan goes: the share of the time rank plans can save at all (every module at r_min) it takes.
    saved_share = (model.dense_ms - model.predict_ms(best)) / max(model.dense_ms - floor_ms, 1e-12)
    info = {"allocator": "latency", "target_speedup": target_speedup,
            "predicted_speedup": model.predict_speedup(best), "predicted_ms": model.predict_ms(best),
            "dense_ms": model.dense_ms, "budget_ms": hi, "r_min": r_min, "align": align,
            "predicted_ceiling": ceiling, "share_of_savable_time": saved_share}
    return best, info


def predicted_error(items: list, ranks: dict[str, int]) -> float:
    """Σ over modules of the relative error their ranks leave (error curve at the rank / curve at rank 0)."""
    total = 0.0
    for item in items:
        curve = item.error_curve
        if curve is not None and float(curve[0]) > 0:
            total += float(curve[ranks[item.name]]) / float(curve[0])
    return total
