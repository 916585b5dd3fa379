"""Per-module latency tables and the latency-budget allocator.

**Table.** Parameters and latency live in different places: SD-1.5's 1280-wide FFNs hold most parameters but
little work, the 320-wide self-attention at 64×64 holds few parameters but most attention work. So we measure,
on the target device, the latency of each module type (FFN, self-attention, cross-attention) at each
resolution level over a grid of widths:

* FFN: the feed-forward at inner width ``r`` (GEGLU projection + down projection);
* attention: the whole attention sub-layer (projections + SDPA + output) on a 2-D grid of per-head q·k and v
  widths. The two do not add up: SDPA kernels want equal q·k and v head widths (flash on CUDA, and the CPU's
  fused kernel), and fall back to slower paths when they differ — :func:`separability` measures how far an
  additive model would be off. An attention whose queries and keys are normalised per head (SD3.5, FLUX:
  ``qk_norm``) has no Q·K site: it is measured over its v widths alone (curve ``attention_vo``).

Modules are deep copies of the model's own (meta-device) modules, resized with the rebuild code and filled with
random values; only shapes matter. Each is called as the denoiser calls it — the arguments its forward pass hands
it (a joint attention's two token streams, FLUX's rotary table), recorded on the meta device and drawn at random
on the target. Where a site's down or output projection is a block of columns of a Linear it shares with another
site (FLUX's single-stream blocks: attention and MLP share ``proj_out``), that block is timed as a Linear of its
own and added to the sub-layer's time. One group per distinct (type, channels, tokens, context) stands for all the
sites that share it. Each table also holds the dense UNet's latency measured in the same run.

The reading side — :class:`LatencyModel` and the latency-budget allocator the ``slim --speedup`` stage uses —
is allocation, not benchmarking, and lives in :mod:`slimdiff.latency`; it is re-exported here.

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
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..errors import SlimDiffError
from ..families import FFN, QK, VO, DenoiserFamily, ModuleSite, block_adapter, family_for, module_sites
from ..families.base import ColumnBlock

# The reading side moved to the core (slim --speedup uses it); these names stay importable from here.
from ..latency import (  # noqa: F401
    TABLE_FORMAT,
    Geometry,
    LatencyModel,
    latency_budget_ranks,
    load_table,
    predicted_error,
    proxy_items,
    site_geometry,
)
from ..latency import hooked_meta_forward
from .timing import cuda_graphed, is_cuda, time_calls

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


def _resized_module(meta_unet: nn.Module, site: ModuleSite, ranks: dict[str, int], device, dtype
                    ) -> tuple[nn.Module, list[tuple[int, int]]]:
    """A real-device copy of the sub-layer that holds ``site`` (FFN or attention), with the given ranks of its
    groups applied by the rebuild code, filled with small random values; and the (in, out) features of the column
    blocks its sites hold in Linears shared with other sites (outside the sub-layer, so not run by it)."""
    from ..rebuild import resize_site

    holder = nn.Module()
    block = copy.deepcopy(meta_unet.get_submodule(site.block))
    holder.add_module("block", block)
    groups = module_sites_of_block(meta_unet, site)
    for group in groups:
        rank = ranks.get(group.kind, group.width)
        if rank < group.width:
            resize_site(holder, replace(group, block="block"), rank)
    adapter = block_adapter(block)
    assert adapter is not None  # the block of a slimmable site has its adapter
    shared = [(linear.in_features, linear.out_features) for group in groups
              for linear in adapter.linears(block, replace(group, block="block")).modules().values()
              if isinstance(linear, ColumnBlock)]
    module = block.get_submodule(site.sublayer).to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.to(dtype).eval().requires_grad_(False), shared


def module_sites_of_block(unet: nn.Module, site: ModuleSite) -> list[ModuleSite]:
    """The groups measured together with ``site``: the FFN alone, or the QK and VO groups of one attention."""
    return [s for s in module_sites(unet) if s.sublayer_path == site.sublayer_path]


def _sublayer_calls(meta: nn.Module, family: DenoiserFamily, paths: set[str], batch: int, latent: tuple[int, int],
                    text_len: int) -> dict[str, tuple[tuple, dict]]:
    """The arguments each sub-layer in ``paths`` gets in the denoiser's forward pass at ``batch`` as ``family``
    calls it, as meta tensors (shapes only)."""
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for path in paths:
        def record(_module, args, kwargs, path=path):
            calls.setdefault(path, (args, kwargs))

        handles.append(meta.get_submodule(path).register_forward_pre_hook(record, with_kwargs=True))
    hooked_meta_forward(meta, family, batch, latent, text_len, handles)
    return calls


def _drawn(value, gen: torch.Generator, device, dtype):
    """``value`` (a recorded argument) with each meta tensor drawn on ``device``: floating tensors seeded normal
    values in ``dtype``, masks all true (no token dropped), integer tensors zeros."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return torch.randn(value.shape, generator=gen).to(device, dtype)
        if value.dtype == torch.bool:
            return torch.ones(value.shape, dtype=torch.bool, device=device)
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    if isinstance(value, (tuple, list)):
        return type(value)(_drawn(v, gen, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _drawn(v, gen, device, dtype) for k, v in value.items()}
    return value


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
                          iters: int = 20, text_len: int | None = None, ffn_align: int | None = None,
                          family: DenoiserFamily | None = None, log=None) -> dict:
    """Measure the table for ``unet``'s architecture on ``device``/``dtype`` at UNet batch ``batch`` (eager
    PyTorch, each call replayed from a CUDA graph on a GPU), with ``text_len`` text tokens (default: the family's,
    e.g. FLUX's 512 T5 tokens), called as ``family`` calls it (default the denoiser's own; FLUX Kontext's pipeline
    adds the reference image's tokens: the table records the family). ``ffn_align`` (default ``8 * align``) spaces
    the FFN widths, which are 32× wider than heads."""
    log = log or (lambda msg: None)
    family = family or family_for(unet)
    text_len = text_len or family.text_tokens
    with torch.device("meta"):
        meta = family.build(cast(dict, unet.config))  # diffusers' FrozenDict
    sites = {s.name: s for s in module_sites(meta)}
    with_qk = {s.sublayer_path for s in sites.values() if s.kind == QK}
    geometry = site_geometry(unet, latent, text_len, family)
    groups: dict[str, dict] = {}
    for name, geo in geometry.items():
        site = sites[name]
        if site.kind == VO and site.sublayer_path in with_qk:
            continue  # measured with its QK partner, one attention sub-layer
        g = groups.setdefault(geo.key, {"key": geo.key, **geo.__dict__, "sites": [], "representative": name})
        g["sites"].append(site.sublayer_path)
    calls = _sublayer_calls(meta, family, {sites[g["representative"]].sublayer_path for g in groups.values()},
                            batch, latent, text_len)
    gen = torch.Generator().manual_seed(0)
    for g in groups.values():
        site = sites[g["representative"]]
        args, kwargs = _drawn(calls[site.sublayer_path], gen, device, dtype)
        width = g["width"]
        curves = {}
        series: dict[str, list]  # settings per curve: ranks, or rows of them (the q·k × v grid)
        if g["kind"] == "ffn":
            grid = rank_grid(width, ffn_align or 8 * align, max_points)
            series = {"ffn": [{FFN: r} for r in grid]}
        elif site.kind == VO:  # q·k normalised per head: no Q·K site
            grid = rank_grid(width, align, max_points)
            series = {"attention_vo": [{VO: v} for v in grid]}
        else:
            grid = rank_grid(width, align, max_points)
            series = {"attention": [[{QK: q, VO: v} for v in grid] for q in grid]}  # rows: q·k width
        for curve, settings in series.items():
            def measure(ranks):
                module, shared = _resized_module(meta, site, ranks, device, dtype)
                ms = _time_module(lambda: module(*args, **kwargs), device, warmup, iters)
                for columns, features in shared:  # the sub-layer's share of a Linear it does not run itself
                    h = torch.randn(batch, g["tokens"], columns, generator=gen).to(device, dtype)
                    w = torch.randn(features, columns, generator=gen).to(device, dtype)
                    ms += _time_module(lambda: torch.nn.functional.linear(h, w), device, warmup, iters)
                return ms

            ms = [[measure(r) for r in row] if isinstance(row, list) else measure(row) for row in settings]
            curves[curve] = {"ranks": grid, "ms": ms}
        g["curves"] = curves
        log(f"latency table: {g['key']} ({len(g['sites'])} sites) measured")
    dense = _dense_unet_ms(unet, family, latent, batch, device, dtype, warmup, iters, text_len)
    from .env import device_info

    return {"format": TABLE_FORMAT, "family": family.name, "device": device_info(device), "dtype": str(dtype).removeprefix("torch."),
            "batch": batch, "latent": list(latent), "text_len": text_len,
            "engine": "cudagraph" if is_cuda(device) else "eager",
            "dense_unet_ms": dense, "groups": list(groups.values())}


def _dense_unet_ms(unet, family, latent, batch, device, dtype, warmup, iters, text_len) -> float:
    call = family.dummy_call(unet.config, batch, latent, text_len)
    gen = torch.Generator().manual_seed(0)

    def drawn(t):  # seeded normal values for every floating input (the timestep and absent conditions as they are)
        if t is None:
            return None
        return torch.randn(t.shape, generator=gen).to(device, dtype) if t.is_floating_point() else t.to(device)

    call = {k: ({n: drawn(v) for n, v in a.items()} if isinstance(a, dict) else drawn(a)) for k, a in call.items()}
    run = cuda_graphed(lambda: unet(**call), device)
    return time_calls(run, device, warmup, iters).median_ms


# ----------------------------------------------------------------------------------------------------------
# Storing and inspecting a table
# ----------------------------------------------------------------------------------------------------------


def save_table(table: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def separability(table: dict) -> dict[str, float]:
    """Per attention group: the largest relative gap between a measured T(r_qk, r_vo) and the additive model
    T(n, n) − [T(n, n) − T(r_qk, n)] − [T(n, n) − T(n, r_vo)] (0 = QK and VO savings add exactly)."""
    out = {}
    for g in table["groups"]:
        if "attention" not in g["curves"]:  # an FFN, or an attention measured over its v widths alone
            continue
        ms = g["curves"]["attention"]["ms"]
        full = ms[-1][-1]
        out[g["key"]] = max(abs(ms[i][j] - (ms[i][-1] + ms[-1][j] - full)) / ms[i][j]
                            for i in range(len(ms)) for j in range(len(ms)))
    return out




def time_breakdown(table: dict) -> list[dict]:
    """Where the denoiser's time goes, read off a latency table: per module group, its sub-layers' summed time
    dense and at the table's smallest ranks, and a last row for everything outside them (residual blocks,
    convolutions, norms, the blocks' input and output projections) — the time no rank plan can shorten.

    The group rows sum sub-layers timed in isolation, so the rest is the dense call's time minus that sum."""
    rows = []
    for g in table["groups"]:
        curves = g["curves"]
        curve = curves.get("ffn") or curves.get("attention") or curves["attention_vo"]
        first, last = curve["ms"][0], curve["ms"][-1]
        if isinstance(first, list):  # the q·k × v grid: both widths at once
            first, last = first[0], last[-1]
        n = len(g["sites"])
        rows.append({"group": g["key"], "kind": g["kind"], "tokens": g["tokens"], "sublayers": n,
                     "dense_ms": n * last, "smallest_ms": n * first, "smallest_rank": curve["ranks"][0]})
    rest = table["dense_unet_ms"] - sum(r["dense_ms"] for r in rows)
    rows.append({"group": "outside the slimmable sub-layers", "kind": "rest", "tokens": None, "sublayers": None,
                 "dense_ms": rest, "smallest_ms": rest, "smallest_rank": None})
    for r in rows:
        r["dense_share"] = r["dense_ms"] / table["dense_unet_ms"]
    return rows
