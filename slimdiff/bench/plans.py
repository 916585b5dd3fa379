"""Slim UNets for benchmarking: real ones from calibration statistics, or shape-true ones without any.

Latency depends on shapes, not values, so at SD-1.5 scale a benchmark needs no calibration: a *synthetic*
plan runs the project's real allocator (:func:`slimdiff.allocate.allocate`) on uniform scores — every module
loses the same fraction of its width, rounded to the alignment grid — and the resized Linears are filled with
seeded random values. Such a model's outputs mean nothing; reports say so and show no error for it.

With calibration statistics the model is slimmed by the real driver (:func:`slimdiff.slim.slim_unet`), and
its error against the dense model is meaningful.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..checks import budget_amount
from ..errors import SlimDiffError
from ..families import ColumnBlock, ModuleSite, module_sites, site_linears
from ..plan import RankPlan
from ..rebuild import apply_plan_shapes

SYNTHETIC = "synthetic"
CALIBRATED = "calibrated"


@dataclass
class SlimModel:
    """A denoiser to benchmark: the dense original (``budget == 0``) or a slim copy, with its provenance."""

    denoiser: nn.Module
    budget: float
    plan: RankPlan | None
    source: str  # "dense" | SYNTHETIC | CALIBRATED
    info: dict = field(default_factory=dict)

    @property
    def unet(self) -> nn.Module:
        """The denoiser under the name scripts written for UNets read."""
        return self.denoiser

    @property
    def meaningful_outputs(self) -> bool:
        return self.source != SYNTHETIC


def resolve_budget(budget: float, sites: list[ModuleSite]) -> float:
    """A fraction (< 1) of the compressible parameter mass, or an absolute number of parameters."""
    return budget_amount(budget, sum(s.params for s in sites))


def _uniform_plan(sites, items, amount: float, what: str, *, align: int, r_min: int, info: dict) -> RankPlan:
    """The real allocator on uniform scores (every module loses the same share of its width, priced by each
    item's unit cost) removing ``amount``; ``what`` names the budget in the error."""
    from .. import allocate as alloc

    try:
        ranks = alloc.allocate(items, amount, temperature=math.inf, r_min=r_min, align=align, method="softmax")
    except ValueError as exc:
        raise SlimDiffError(f"cannot remove {what}: {exc}") from exc
    return RankPlan.from_ranks(sites, ranks, info={
        "source": SYNTHETIC, "scores": "uniform (no calibration statistics)", **info,
        "budget_resolved": amount, "align": align, "r_min": r_min})


def synthetic_plan(unet: nn.Module, budget: float, *, align: int = 8, r_min: int = 8) -> RankPlan:
    """Ranks from the real allocator on uniform scores (no statistics): one removal fraction everywhere."""
    from .. import allocate as alloc

    sites = module_sites(unet)
    items = [alloc.AllocationItem(s.name, s.width, float(s.unit_params), 0.0) for s in sites]
    return _uniform_plan(sites, items, resolve_budget(budget, sites), f"{budget} of the compressible parameters",
                         align=align, r_min=r_min, info={"budget": budget})


def transformer_mac_plan(unet: nn.Module, fraction: float, latent: tuple[int, int], text_len: int | None = None, *,
                         align: int = 8, r_min: int = 8, family=None) -> RankPlan:
    """Ranks that remove ``fraction`` of the transformer-block MACs that ranks can remove — each site's MACs per rank
    times its width: nearly all of a UNet's block MACs, not the q·k FLUX keeps dense — of one denoiser call at
    ``latent`` (uniform scores: every module loses the same share of its width). Each site is priced by its block adapter (MACs per sample removed per
    rank: projections and attention products) with the token counts of a meta-device forward at ``latent``, called as
    ``family`` calls it (default the denoiser's own)."""
    from .. import allocate as alloc
    from ..families import site_adapter
    from ..latency import site_geometry

    if not 0 < fraction < 1:
        raise SlimDiffError(f"the fraction of transformer MACs to remove must be in (0, 1), got {fraction}")
    sites = module_sites(unet)
    geometry = site_geometry(unet, latent, text_len, family)
    # (query, key/value) tokens per sample of every sub-layer (an FFN's: its tokens twice)
    tokens = {s.sublayer_path: (geometry[s.name].tokens, geometry[s.name].context_tokens) for s in sites}
    items = []
    for s in sites:
        block, adapter = site_adapter(unet, s)
        cost = adapter.unit_macs(block, s, lambda sublayer, b=s.block: tokens[f"{b}.{sublayer}"])
        items.append(alloc.AllocationItem(s.name, s.width, float(cost), 0.0))
    amount = fraction * sum(item.unit_cost * item.width for item in items)
    return _uniform_plan(sites, items, amount, f"{fraction} of the transformer MACs", align=align, r_min=r_min,
                         info={"budget": fraction, "budget_unit": "transformer MACs", "latent": list(latent),
                               "text_len": text_len})


def _copy_except_resized(unet: nn.Module, plan: RankPlan) -> nn.Module:
    """A deep copy of ``unet`` in which the Linears ``plan`` resizes hold empty placeholder weights: they are
    replaced right after, and copying them first would double an SDXL UNet's memory (10 GB in fp32) for nothing. A
    Linear several sites share by column blocks (FLUX's single-stream ``proj_out``) is copied whole: resizing one
    site's block keeps the other blocks' columns and the bias."""
    memo: dict[int, object] = {}
    for site in module_sites(unet):
        entry = plan.modules.get(site.name)
        if entry is None or entry.rank >= entry.width:
            continue
        for lin in site_linears(unet, site).modules().values():
            if isinstance(lin, ColumnBlock):
                continue
            for p in (lin.weight, lin.bias):
                if p is not None:
                    memo[id(p)] = nn.Parameter(torch.empty(0, device=p.device, dtype=p.dtype), requires_grad=False)
    return copy.deepcopy(unet, memo)


@torch.no_grad()
def seeded_slim_copy(unet: nn.Module, plan: RankPlan, seed: int = 0) -> nn.Module:
    """A copy of ``unet`` with ``plan``'s shapes; every resized Linear drawn from ``seed`` (PyTorch's default
    Linear initialisation, U(±1/√fan_in)), the rest of the weights shared in value with the original."""
    slim = apply_plan_shapes(_copy_except_resized(unet, plan), plan)
    gen = torch.Generator().manual_seed(seed)
    for site in module_sites(slim):  # sites of the slim model: widths are the new ranks
        if plan.modules[site.name].rank == plan.modules[site.name].width:
            continue
        for lin in site_linears(slim, site).modules().values():
            bound = 1.0 / math.sqrt(lin.in_features)
            for p in (lin.weight, lin.bias):
                if p is not None:
                    p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound)
    slim.slim_plan = plan
    return slim.eval().requires_grad_(False)


def calibrated_slim_copy(unet: nn.Module, stats, config) -> tuple[nn.Module, RankPlan, object]:
    """``slim_unet`` on a copy of ``unet`` (the dense model stays intact for comparison)."""
    from ..slim import slim_unet

    slim = copy.deepcopy(unet)
    report = slim_unet(slim, stats, config, progress=False)
    report.plan.info["source"] = CALIBRATED
    return slim.eval().requires_grad_(False), report.plan, report


def make_models(unet: nn.Module, budgets: list[float], *, stats=None, slim_config=None, seed: int = 0,
                align: int = 8, r_min: int = 8, unit: str = "params", latent: tuple[int, int] | None = None,
                text_len: int = 77) -> list[SlimModel]:
    """The dense model (budget 0) and one slim copy per positive budget: calibrated when ``stats`` are given,
    synthetic (uniform scores, seeded weights) otherwise. ``unit``: budgets are fractions of the compressible
    parameters (``params``) or of the transformer-block MACs of one call at ``latent`` (``macs``)."""
    if unit not in ("params", "macs"):
        raise SlimDiffError(f"budget unit must be params or macs, got {unit!r}")
    if unit == "macs" and stats is None and latent is None:
        raise SlimDiffError("MAC budgets need the latent size the MACs are counted at")
    models = []
    for budget in budgets:
        if budget < 0:
            raise SlimDiffError(f"budgets must be ≥ 0 (0 = dense), got {budget}")
        if budget == 0:
            models.append(SlimModel(unet, 0.0, None, "dense"))
        elif stats is not None:
            if slim_config is None:
                raise SlimDiffError("calibrated slim models need a SlimConfig")
            config = replace(slim_config, budget=budget, budget_unit=unit)
            slim, plan, report = calibrated_slim_copy(unet, stats, config)
            models.append(SlimModel(slim, budget, plan, CALIBRATED, {"relative_errors": report.relative_errors}))
        else:
            plan = (transformer_mac_plan(unet, budget, latent, text_len, align=align, r_min=r_min) if unit == "macs"
                    else synthetic_plan(unet, budget, align=align, r_min=r_min))
            models.append(SlimModel(seeded_slim_copy(unet, plan, seed), budget, plan, SYNTHETIC))
    return models
