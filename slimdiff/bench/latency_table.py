"""Per-module latency tables and the latency-budget allocator.

**Table.** Parameters and latency live in different places: SD-1.5's 1280-wide FFNs hold most parameters but
little work, the 320-wide self-attention at 64×64 holds few parameters but most attention work. So we measure,
on the target device, the latency of each module type (FFN, self-attention, cross-attention) at each
resolution level over a grid of widths:

* FFN: the feed-forward at inner width ``r`` (GEGLU projection + down projection);
* attention: the whole attention sub-layer (projections + SDPA + output) on a 2-D grid of per-head q·k and v
  widths. The two do not add up: SDPA kernels want equal q·k and v head widths (flash on CUDA, and the CPU's
  fused kernel), and fall back to slower paths when they differ — :func:`separability` measures how far an
  additive model would be off.

Modules are deep copies of the model's own (meta-device) modules, resized with the rebuild code and filled with
random values; only shapes matter. One group per distinct (type, channels, tokens, context) stands for all the
sites that share it. Each table also holds the dense UNet's latency measured in the same run.

**Prediction.** UNet latency under a rank plan = dense latency − Σ over sub-layers of the saving their ranks
buy on their group's curve (linear interpolation between measured widths; bilinear on the attention grid).

**Allocator.** :func:`latency_budget_ranks` meets a target speed-up with the least predicted error. It reuses
:func:`slimdiff.allocate.allocate` — greedy on the closed-form error curves — with each module's cost per unit
of width set to its *latency* saving per unit (the table's slope over its removable range), then searches the
budget (ms) by bisection until the table-predicted speed-up reaches the target. Without calibration the error
curves are a stated proxy: relative error = fraction of the width removed, the same for every module.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import SlimDiffError
from ..models import FFN, QK, VO, ModuleSite, module_sites
from .timing import cuda_graphed, is_cuda, time_calls

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


def site_geometry(unet: nn.Module, latent: tuple[int, int], text_len: int = 77) -> dict[str, Geometry]:
    """Geometry of every site of a (dense, meta or real) UNet, read off one meta-device forward pass."""
    from .macs import meta_unet

    meta = meta_unet(unet.config)
    sites = module_sites(meta)
    seen: dict[str, tuple[int, int, int]] = {}
    handles = []

    def hook(path):
        def record(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            ctx = kwargs.get("encoder_hidden_states")
            ctx = x if ctx is None else ctx
            seen[path] = (x.shape[-2], ctx.shape[-2], ctx.shape[-1])

        return record

    for site in sites:
        if site.attn and f"{site.block}.{site.attn}" not in seen:
            path = f"{site.block}.{site.attn}"
            seen[path] = None
            handles.append(meta.get_submodule(path).register_forward_pre_hook(hook(path), with_kwargs=True))
    cfg = meta.config
    with torch.no_grad():
        meta(torch.zeros(1, cfg.in_channels, *latent, device="meta"), torch.zeros(1, device="meta"),
             encoder_hidden_states=torch.zeros(1, text_len, cfg.cross_attention_dim, device="meta"))
    for h in handles:
        h.remove()
    out = {}
    for site in sites:
        block = meta.get_submodule(site.block)
        tokens = seen[f"{site.block}.attn1"][0]
        if site.kind == FFN:
            channels = block.ff.net[2].out_features
            out[site.name] = Geometry("ffn", channels, tokens, tokens, channels, 1, site.width)
        else:
            attn = getattr(block, site.attn)
            lq, lk, ck = seen[f"{site.block}.{site.attn}"]
            out[site.name] = Geometry(site.attn, attn.to_q.in_features, lq, lk, ck, site.heads, site.width)
    return out


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------


def rank_grid(width: int, align: int, max_points: int) -> list[int]:
    """Widths to measure: multiples of ``align`` up to ``width`` (and ``width`` itself), thinned evenly to at
    most ``max_points`` (the smallest and the full width always kept)."""
    if align < 1 or max_points < 2:
        raise SlimDiffError("rank grid needs align ≥ 1 and at least 2 points")
    ranks = sorted({*range(align, width, align), width})
    if len(ranks) > max_points:
        picks = {round(i * (len(ranks) - 1) / (max_points - 1)) for i in range(max_points)}
        ranks = [ranks[i] for i in sorted(picks)]
    return ranks


def _resized_module(meta_unet: nn.Module, site: ModuleSite, ranks: dict[str, int], device, dtype) -> nn.Module:
    """A real-device copy of the sub-layer that holds ``site`` (FFN or attention), with the given ranks of its
    groups applied by the rebuild code, filled with small random values."""
    from ..rebuild import resize_site

    holder = nn.Module()
    sub = "ff" if site.kind == FFN else site.attn
    block = copy.deepcopy(meta_unet.get_submodule(site.block))
    holder.add_module("block", block)
    for group in module_sites_of_block(meta_unet, site):
        rank = ranks.get(group.kind, group.width)
        if rank < group.width:
            resize_site(holder, replace(group, block="block"), rank)
    module = getattr(block, sub).to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.to(dtype).eval().requires_grad_(False)


def module_sites_of_block(unet: nn.Module, site: ModuleSite) -> list[ModuleSite]:
    """The groups measured together with ``site``: the FFN alone, or the QK and VO groups of one attention."""
    return [s for s in module_sites(unet) if s.block == site.block and s.attn == site.attn]


def _time_module(fn, device, warmup: int, iters: int) -> float:
    """Median ms of one call; short calls are repeated inside each timed sample so that the timer's own cost
    (event records, Python) stays small against the work."""
    with torch.no_grad():
        for _ in range(max(1, warmup)):
            fn()
    fn = cuda_graphed(fn, device)
    probe = time_calls(fn, device, 0, 3).median_ms
    repeat = max(1, min(50, math.ceil(1.0 / max(probe, 1e-3))))

    def many():
        for _ in range(repeat):
            fn()

    return time_calls(many, device, 1, iters).median_ms / repeat


def measure_latency_table(unet: nn.Module, latent: tuple[int, int], batch: int = 1, *, device="cpu",
                          dtype=torch.float32, align: int = 8, max_points: int = 8, warmup: int = 3,
                          iters: int = 20, text_len: int = 77, ffn_align: int | None = None, log=None) -> dict:
    """Measure the table for ``unet``'s architecture on ``device``/``dtype`` at UNet batch ``batch`` (eager
    PyTorch, each call replayed from a CUDA graph on a GPU). ``ffn_align`` (default ``8 * align``) spaces the FFN widths, which are 32× wider than heads."""
    from .macs import meta_unet

    log = log or (lambda msg: None)
    meta = meta_unet(unet.config)
    geometry = site_geometry(unet, latent, text_len)
    sites = {s.name: s for s in module_sites(meta)}
    groups: dict[str, dict] = {}
    for name, geo in geometry.items():
        site = sites[name]
        if site.kind == VO:
            continue  # measured with its QK partner, one attention sub-layer
        g = groups.setdefault(geo.key, {"key": geo.key, **geo.__dict__, "sites": [], "representative": name})
        g["sites"].append(site.block + ("" if site.kind == FFN else f".{site.attn}"))
    gen = torch.Generator().manual_seed(0)
    for g in groups.values():
        site = sites[g["representative"]]
        x = torch.randn(batch, g["tokens"], g["channels"], generator=gen).to(device, dtype)
        ctx = None if g["kind"] != "attn2" else torch.randn(batch, g["context_tokens"], g["context_dim"],
                                                            generator=gen).to(device, dtype)
        width = g["width"]
        curves = {}
        if g["kind"] == "ffn":
            grid = rank_grid(width, ffn_align or 8 * align, max_points)
            series = {"ffn": [{FFN: r} for r in grid]}
        else:
            grid = rank_grid(width, align, max_points)
            series = {"attention": [[{QK: q, VO: v} for v in grid] for q in grid]}  # rows: q·k width
        for curve, settings in series.items():
            def measure(ranks):
                module = _resized_module(meta, site, ranks, device, dtype)
                if g["kind"] == "ffn":
                    return _time_module(lambda: module(x), device, warmup, iters)
                return _time_module(lambda: module(x, encoder_hidden_states=ctx), device, warmup, iters)

            ms = [[measure(r) for r in row] if isinstance(row, list) else measure(row) for row in settings]
            curves[curve] = {"ranks": grid, "ms": ms}
        g["curves"] = curves
        log(f"latency table: {g['key']} ({len(g['sites'])} sites) measured")
    dense = _dense_unet_ms(unet, latent, batch, device, dtype, warmup, iters, text_len)
    from .env import device_info

    return {"format": TABLE_FORMAT, "device": device_info(device), "dtype": str(dtype).removeprefix("torch."),
            "batch": batch, "latent": list(latent), "text_len": text_len,
            "engine": "cudagraph" if is_cuda(device) else "eager",
            "dense_unet_ms": dense, "groups": list(groups.values())}


def _dense_unet_ms(unet, latent, batch, device, dtype, warmup, iters, text_len) -> float:
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, cfg.in_channels, *latent, generator=gen).to(device, dtype)
    ctx = torch.randn(batch, text_len, cfg.cross_attention_dim, generator=gen).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)
    run = cuda_graphed(lambda: unet(sample, t, encoder_hidden_states=ctx), device)
    return time_calls(run, device, warmup, iters).median_ms


# ----------------------------------------------------------------------------------------------------------
# Storing and predicting
# ----------------------------------------------------------------------------------------------------------


def save_table(table: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


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

    def __init__(self, table: dict, unet: nn.Module, latent: tuple[int, int] | None = None):
        latent = tuple(latent or table["latent"])
        if list(latent) != list(table["latent"]):
            raise SlimDiffError(f"the latency table was measured at latent {table['latent']}, not {list(latent)}")
        self.table = table
        self.dense_ms = float(table["dense_unet_ms"])
        groups = {g["key"]: g for g in table["groups"]}
        self.sites = module_sites(unet)
        self.width = {s.name: s.width for s in self.sites}
        geometry = site_geometry(unet, latent, table["text_len"])
        # One entry per sub-layer: (FFN site,) or (QK site, VO site) of one attention.
        self.layers: dict[str, tuple[dict, tuple[str, ...]]] = {}
        for s in self.sites:
            g = groups.get(geometry[s.name].key)
            if g is None:
                raise SlimDiffError(f"the latency table has no entry for {s.name} ({geometry[s.name].key}); "
                                    "measure a table for this architecture")
            layer = s.block + ("" if s.kind == FFN else f".{s.attn}")
            curve = g["curves"]["ffn" if s.kind == FFN else "attention"]
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


def separability(table: dict) -> dict[str, float]:
    """Per attention group: the largest relative gap between a measured T(r_qk, r_vo) and the additive model
    T(n, n) − [T(n, n) − T(r_qk, n)] − [T(n, n) − T(n, r_vo)] (0 = QK and VO savings add exactly)."""
    out = {}
    for g in table["groups"]:
        if g["kind"] == "ffn":
            continue
        ms = g["curves"]["attention"]["ms"]
        full = ms[-1][-1]
        out[g["key"]] = max(abs(ms[i][j] - (ms[i][-1] + ms[-1][j] - full)) / ms[i][j]
                            for i in range(len(ms)) for j in range(len(ms)))
    return out


# ----------------------------------------------------------------------------------------------------------
# The latency-budget allocator
# ----------------------------------------------------------------------------------------------------------


def proxy_items(unet: nn.Module) -> list:
    """Allocation items without calibration: uniform scores and the error proxy 'relative error = fraction of
    the width removed' for every module (states no preference between modules beyond their cost)."""
    from ..allocate import AllocationItem

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
    from ..allocate import allocate

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
    if model.predict_speedup(best) < target_speedup:
        raise SlimDiffError(f"target speed-up {target_speedup:.3f} is out of reach: the smallest ranks are "
                            f"predicted at {model.predict_speedup(best):.3f}×")
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
    info = {"allocator": "latency", "target_speedup": target_speedup,
            "predicted_speedup": model.predict_speedup(best), "predicted_ms": model.predict_ms(best),
            "dense_ms": model.dense_ms, "budget_ms": hi, "r_min": r_min, "align": align}
    return best, info


def predicted_error(items: list, ranks: dict[str, int]) -> float:
    """Σ over modules of the relative error their ranks leave (error curve at the rank / curve at rank 0)."""
    total = 0.0
    for item in items:
        curve = item.error_curve
        if curve is not None and float(curve[0]) > 0:
            total += float(curve[ranks[item.name]]) / float(curve[0])
    return total
