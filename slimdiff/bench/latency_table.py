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

import torch
from torch import nn

from ..errors import SlimDiffError
from ..families import CROSS, FFN, QK, VO, ModuleSite, family_for, module_sites, site_linears
from ..families.base import JointQKLinears

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


def _resized_module(meta_unet: nn.Module, site: ModuleSite, ranks: dict[str, int], device, dtype) -> nn.Module:
    """A real-device copy of the sub-layer that holds ``site`` (FFN or attention), with the given ranks of its
    groups applied by the rebuild code, filled with small random values."""
    from ..rebuild import resize_site

    holder = nn.Module()
    block = copy.deepcopy(meta_unet.get_submodule(site.block))
    holder.add_module("block", block)
    for group in module_sites_of_block(meta_unet, site):
        rank = ranks.get(group.kind, group.width)
        if rank < group.width:
            resize_site(holder, replace(group, block="block"), rank)
    module = block.get_submodule(site.sublayer).to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.to(dtype).eval().requires_grad_(False)


def module_sites_of_block(unet: nn.Module, site: ModuleSite) -> list[ModuleSite]:
    """The groups measured together with ``site``: the FFN alone, or the QK and VO groups of one attention."""
    return [s for s in module_sites(unet) if s.sublayer_path == site.sublayer_path]


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
    log = log or (lambda msg: None)
    with torch.device("meta"):
        meta = family_for(unet).build(unet.config)
    sites = {s.name: s for s in module_sites(meta)}
    joint = sorted({s.sublayer_path for s in sites.values() if s.kind == QK
                    and isinstance(site_linears(meta, s), JointQKLinears)})
    if joint:
        raise SlimDiffError(f"the latency table times each sub-layer on one token stream; {joint[0]} is a joint "
                            f"attention over two ({len(joint)} such in {type(unet).__name__}), which it does not "
                            "drive yet")
    geometry = site_geometry(unet, latent, text_len)
    groups: dict[str, dict] = {}
    for name, geo in geometry.items():
        site = sites[name]
        if site.kind == VO:
            continue  # measured with its QK partner, one attention sub-layer
        g = groups.setdefault(geo.key, {"key": geo.key, **geo.__dict__, "sites": [], "representative": name})
        g["sites"].append(site.sublayer_path)
    gen = torch.Generator().manual_seed(0)
    for g in groups.values():
        site = sites[g["representative"]]
        x = torch.randn(batch, g["tokens"], g["channels"], generator=gen).to(device, dtype)
        ctx = None if site.attention != CROSS else torch.randn(batch, g["context_tokens"], g["context_dim"],
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
    call = family_for(unet).dummy_call(unet.config, batch, latent, text_len)
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
        if g["kind"] == "ffn":
            continue
        ms = g["curves"]["attention"]["ms"]
        full = ms[-1][-1]
        out[g["key"]] = max(abs(ms[i][j] - (ms[i][-1] + ms[-1][j] - full)) / ms[i][j]
                            for i in range(len(ms)) for j in range(len(ms)))
    return out


