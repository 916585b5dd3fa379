"""The slimming driver: statistics → scores → ranks → closed-form factors → a smaller UNet, in place.

This is the only module that knows both the diffusers module layout and the pure linear algebra of
:mod:`slimdiff.analyze`, :mod:`slimdiff.decompose` and :mod:`slimdiff.allocate`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from . import allocate as alloc
from . import analyze, decompose
from .calibrate import CalibrationConfig, Statistics, _prior
from .errors import SlimDiffError
from .models import FFN, QK, ModuleSite, module_sites
from .plan import RankPlan
from .rebuild import apply_plan_shapes, load_slim_weights


@dataclass(frozen=True)
class SlimConfig:
    """How much to remove and how.

    ``budget``: below 1, a fraction of the compressible mass (parameters or MACs, per ``budget_unit``);
    from 1 up, an absolute amount to remove (e.g. ``100e6`` parameters).
    ``exclude``: module-name fragments or kinds (``ffn``/``qk``/``vo``/``attn1``/``attn2``) left untouched.
    ``speedup`` with ``latency_table`` (a JSON table from ``slimdiff bench --latency-table``, measured on the
    deployment GPU): a latency budget instead — the least predicted error whose table-predicted UNet speed-up
    reaches ``speedup``; ``budget`` and ``budget_unit`` are then unused.
    """

    budget: float = 0.4
    budget_unit: str = "params"  # or "macs"
    # greedy on the closed-form error curves (method.md §7's alternative) is the default: in the proxy ablation
    # the entropic softmax on TRQ × propagation scores lost to uniform allocation (bench/results/quality-*).
    allocator: str = "greedy"  # greedy (error curves) | softmax (entropic, §7) | uniform
    # ε: None picks per allocator — 0.1 for the softmax (method.md §7), ∞ for greedy (error curves alone: in the
    # proxy ablation weighting them by the module scores raised the error 1.4–2.6× at every budget).
    temperature: float | None = None
    r_min: int = 8
    align: int = 8
    beta: float = 1.0  # propagation exponent in the module score
    ffn_selector: str = "cholesky"  # cholesky | leverage | output | magnitude | random
    ffn_correction: bool = True
    qk_method: str = "whitened_svd"  # whitened_svd | cr | weight_svd (data-free)
    vo_statistic: str = "output"  # output (attention-output Gram) | value (value-input Gram) | none (data-free)
    ridge_ffn: float = 1e-4
    ridge_qk: float = 1e-6
    ridge_vo: float = 1e-4
    exclude: tuple[str, ...] = ()
    seed: int = 0  # only the random selector uses it
    speedup: float | None = None
    latency_table: str | None = None

    def resolved_temperature(self) -> float:
        """The ε the allocator runs with (uniform allocation is the softmax at ε = ∞)."""
        if self.allocator == "uniform":
            return math.inf
        if self.temperature is not None:
            return self.temperature
        return 0.1 if self.allocator == "softmax" else math.inf

    def __post_init__(self):
        if self.budget <= 0:
            raise SlimDiffError(f"budget must be positive, got {self.budget}")
        if self.budget_unit not in ("params", "macs"):
            raise SlimDiffError(f"budget unit must be params or macs, got {self.budget_unit!r}")
        if self.allocator not in ("softmax", "greedy", "uniform"):
            raise SlimDiffError(f"unknown allocator {self.allocator!r} (softmax, greedy, uniform)")
        if self.ffn_selector not in ("cholesky", "leverage", "output", "magnitude", "random"):
            raise SlimDiffError(f"unknown FFN selector {self.ffn_selector!r}")
        if self.qk_method not in ("whitened_svd", "cr", "weight_svd"):
            raise SlimDiffError(f"unknown QK method {self.qk_method!r}")
        if self.vo_statistic not in ("output", "value", "none"):
            raise SlimDiffError(f"unknown VO statistic {self.vo_statistic!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise SlimDiffError(f"temperature must be positive, got {self.temperature}")
        if (self.speedup is None) != (self.latency_table is None):
            raise SlimDiffError("a latency budget needs both a target speed-up and a latency table")
        if self.speedup is not None and not self.speedup > 1:
            raise SlimDiffError(f"target speed-up must exceed 1, got {self.speedup}")


def parse_budget(text: str) -> float:
    """``0.4`` → fraction; ``100M`` / ``2.5G`` / ``150000`` → absolute amount."""
    text = str(text).strip()
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise SlimDiffError(f"budget {text!r} is neither a fraction (0.4) nor an amount (100M)") from None
    if value <= 0:
        raise SlimDiffError(f"budget must be positive, got {text}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Per-module statistics, aggregated over timesteps
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SiteAnalysis:
    site: ModuleSite
    rho: torch.Tensor  # (T,) TRQ per timestep
    weights: torch.Tensor  # (T,) timestep fidelity weights
    propagation: torch.Tensor  # (T,) relative residual-update energy
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # aggregated moments for the decomposition


def _per_token(stats: Statistics, key: str, tokens_key: str) -> torch.Tensor:
    """(T, ...) sums → per-token means."""
    sums, tokens = stats.tensors[key], stats.tensors[tokens_key]
    return sums / tokens.reshape(-1, *([1] * (sums.ndim - 1)))


def _weights(rho: torch.Tensor, config: CalibrationConfig) -> torch.Tensor:
    n = rho.shape[-1]
    if config.weighting == "uniform":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if config.weighting == "single":
        w = torch.zeros(n, dtype=torch.float64)
        w[n // 2] = 1.0
        return w
    return analyze.timestep_weights(rho, gamma=config.gamma, prior=_prior(n, config.prior))


def _weighted(per_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("t,t...->...", w, per_t)


def analyze_sites(unet, stats: Statistics, sites: list[ModuleSite]) -> dict[str, SiteAnalysis]:
    """TRQ per timestep, fidelity weights, propagation and aggregated moments for every site."""
    out = {}
    t = stats.tensors
    for site in sites:
        block = unet.get_submodule(site.block)
        sub = "ff" if site.kind == FFN else site.attn
        prefix = f"{site.block}.{sub}"
        prop = t[f"{prefix}.upd_energy"] / t[f"{prefix}.res_energy"]
        if site.kind == FFN:
            down = block.ff.net[2].weight.detach().double().cpu()
            tok = t[f"{prefix}.tokens"]
            rho = analyze.trq_from_energies(t[f"{prefix}.hout_energy"] / tok, t[f"{prefix}.h_energy"] / tok,
                                            down.pow(2).sum(), down.shape[1])
            weights = stats.ffn_weights[prefix]
            inputs = {"moment": t[f"{prefix}.moment"] / t[f"{prefix}.moment_norm"]}
        else:
            attn = getattr(block, site.attn)
            sigma_x = _per_token(stats, f"{prefix}.in", f"{prefix}.in_tokens")
            ctx_key = f"{prefix}.ctx"
            sigma_y_static = t[ctx_key] / t[f"{ctx_key}_tokens"] if ctx_key in t else None
            if site.kind == QK:
                q = attn.to_q.weight.detach().double().cpu()
                k = attn.to_k.weight.detach().double().cpu()
                rho = torch.stack([
                    analyze.trq_qk(q, k, sx, sx if sigma_y_static is None else sigma_y_static, site.heads)
                    for sx in sigma_x])
                weights = _weights(rho, stats.config)
                agg_x = _weighted(sigma_x, weights)
                inputs = {"sigma_x": agg_x, "sigma_y": agg_x if sigma_y_static is None else sigma_y_static}
            else:
                o = attn.to_out[0].weight.detach().double().cpu()
                grams = _per_token(stats, f"{prefix}.z_gram", f"{prefix}.z_tokens")
                rho = torch.stack([analyze.trq_vo(o, g, site.heads) for g in grams])
                weights = _weights(rho, stats.config)
                inputs = {"gram_z": _weighted(grams, weights),
                          "sigma_v": _weighted(sigma_x, weights) if sigma_y_static is None else sigma_y_static}
        out[site.name] = SiteAnalysis(site, rho, weights, prop, inputs)
    return out


# ----------------------------------------------------------------------------------------------------------
# Decomposition of one site
# ----------------------------------------------------------------------------------------------------------


def _w(module: torch.nn.Linear) -> torch.Tensor:
    return module.weight.detach().double().cpu()


def _b(module: torch.nn.Linear) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().double().cpu()


@dataclass
class SiteResult:
    tensors: dict[str, torch.Tensor]  # state-dict name → new value (float64, CPU)
    relative_error: float
    error_curve: torch.Tensor | None


def decompose_site(unet, analysis: SiteAnalysis, rank: int, config: SlimConfig) -> SiteResult:
    """Closed-form factors of one site at ``rank``; tensors cover every parameter of each resized Linear."""
    site = analysis.site
    block = unet.get_submodule(site.block)
    p = site.block
    if site.kind == FFN:
        proj, down = block.ff.net[0].proj, block.ff.net[2]
        res = decompose.ffn_decompose(
            _w(proj), _b(proj), _w(down), analysis.inputs["moment"], rank,
            gated=proj.out_features == 2 * site.width, ridge=config.ridge_ffn, selector=config.ffn_selector,
            correct_down=config.ffn_correction, generator=torch.Generator().manual_seed(config.seed),
        )
        tensors = {f"{p}.ff.net.0.proj.weight": res.proj_weight, f"{p}.ff.net.2.weight": res.down_weight}
        if res.proj_bias is not None:
            tensors[f"{p}.ff.net.0.proj.bias"] = res.proj_bias
        if down.bias is not None:
            tensors[f"{p}.ff.net.2.bias"] = _b(down)
        return SiteResult(tensors, float(res.relative_error), res.error_curve)
    attn = getattr(block, site.attn)
    a = f"{p}.{site.attn}"
    if site.kind == QK:
        res = decompose.qk_decompose(_w(attn.to_q), _w(attn.to_k), analysis.inputs["sigma_x"],
                                     analysis.inputs["sigma_y"], site.heads, rank, ridge=config.ridge_qk,
                                     selector=config.qk_method, q_bias=_b(attn.to_q), k_bias=_b(attn.to_k))
        return SiteResult({f"{a}.to_q.weight": res.q_weight, f"{a}.to_k.weight": res.k_weight},
                          float(res.relative_error), res.error_curve)
    v, o = _w(attn.to_v), _w(attn.to_out[0])
    if config.vo_statistic == "output":
        gram = analysis.inputs["gram_z"]
    elif config.vo_statistic == "value":
        gram = decompose.value_gram(v, analysis.inputs["sigma_v"], site.heads)
    else:
        gram = None
    res = decompose.vo_decompose(v, o, gram, site.heads, rank, ridge=config.ridge_vo, v_bias=_b(attn.to_v))
    tensors = {f"{a}.to_v.weight": res.v_weight, f"{a}.to_out.0.weight": res.o_weight}
    if attn.to_out[0].bias is not None:
        tensors[f"{a}.to_out.0.bias"] = _b(attn.to_out[0])
    return SiteResult(tensors, float(res.relative_error), res.error_curve)


# ----------------------------------------------------------------------------------------------------------
# Costs, allocation, rebuild
# ----------------------------------------------------------------------------------------------------------


def unit_macs(unet, site: ModuleSite, stats: Statistics) -> int:
    """MACs per sample per UNet call removed when the site's rank drops by one (linears + attention products)."""
    block = unet.get_submodule(site.block)
    t = stats.tensors
    if site.kind == FFN:
        seq = int(t[f"{site.block}.attn1.seq"])
        return site.unit_params * seq
    attn = getattr(block, site.attn)
    key = f"{site.block}.{site.attn}"
    lq = int(t[f"{key}.seq"])
    lk = int(t[f"{key}.ctx.seq"]) if f"{key}.ctx.seq" in t else lq
    if site.kind == QK:
        per_head = attn.to_q.in_features * lq + attn.to_k.in_features * lk + lq * lk
    else:
        per_head = attn.to_v.in_features * lk + attn.to_out[0].out_features * lq + lq * lk
    return site.heads * per_head


def _excluded(site: ModuleSite, patterns: tuple[str, ...]) -> bool:
    return any(p == site.kind or p in site.name for p in patterns)


def _latency_model(unet, config: SlimConfig):
    from .bench.latency_table import LatencyModel, load_table

    return LatencyModel(load_table(config.latency_table), unet)


def check_budget(unet, config: SlimConfig) -> None:
    """Refuse a parameter budget the pool cannot give, or a latency table of another architecture, before a
    calibration that can take hours (a MAC budget needs statistics, so it is checked later)."""
    if config.speedup is not None:
        from .bench.latency_table import latency_budget_ranks, proxy_items

        # Whether the target is reachable depends on the table alone (every module at its floor), not on the
        # error curves that calibration would bring.
        latency_budget_ranks(proxy_items(unet), _latency_model(unet, config), config.speedup, r_min=config.r_min,
                             align=config.align)
        return
    if config.budget_unit != "params":
        return
    pool = [s for s in module_sites(unet) if not _excluded(s, config.exclude)]
    total = sum(s.params for s in pool)
    removable = sum(s.unit_params * (s.width - min(config.r_min, s.width)) for s in pool)
    budget = config.budget * total if config.budget < 1 else config.budget
    if budget >= removable:
        raise SlimDiffError(f"budget of {budget:,.0f} parameters is not below the {removable:,} the compressible "
                            f"modules can give up (of {total:,}) with r_min={config.r_min}")


@dataclass
class SlimReport:
    plan: RankPlan
    params_before: int
    params_after: int
    relative_errors: dict[str, float]
    scores: dict[str, float]
    seconds: float

    def summary(self) -> dict:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "params_removed": self.params_before - self.params_after,
                "removed_by_kind": self.plan.removed_by_kind(), "seconds": round(self.seconds, 2)}


def allocation_items(unet, stats: Statistics, config: SlimConfig, with_curves: bool = False,
                     progress: bool = True) -> tuple[list[alloc.AllocationItem], dict[str, SiteAnalysis]]:
    """The allocation pool (sites not excluded) with module scores, costs and, optionally, error curves."""
    stats.check_model(unet)
    pool = [s for s in module_sites(unet) if not _excluded(s, config.exclude)]
    if not pool:
        raise SlimDiffError("every module is excluded: nothing to slim")
    analyses = analyze_sites(unet, stats, pool)
    rho = torch.stack([analyses[s.name].rho for s in pool])
    w = torch.stack([analyses[s.name].weights for s in pool])
    prop = torch.stack([analyses[s.name].propagation for s in pool])
    scores = analyze.module_scores(rho, w, prop, beta=config.beta)
    curves = {}
    if with_curves:
        for s in tqdm(pool, desc="error curves", disable=not progress):
            curves[s.name] = decompose_site(unet, analyses[s.name], s.width, config).error_curve
    items = [alloc.AllocationItem(s.name, s.width,
                                  s.unit_params if config.budget_unit == "params" else unit_macs(unet, s, stats),
                                  float(scores[i]), curves.get(s.name))
             for i, s in enumerate(pool)]
    return items, analyses


def apply_ranks(unet, stats: Statistics, ranks: dict[str, int], config: SlimConfig, info: dict | None = None,
                analyses: dict[str, SiteAnalysis] | None = None, progress: bool = True) -> SlimReport:
    """Decompose every site at its rank (sites not named keep full width) and rebuild ``unet`` in place."""
    start = time.perf_counter()
    sites = module_sites(unet)
    plan = RankPlan.from_ranks(sites, ranks, info={
        "slim_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "calibration": asdict(stats.config), "num_prompts": stats.num_prompts, **(info or {}),
    })
    todo = [s for s in sites if plan.modules[s.name].rank < s.width]
    if analyses is None:
        stats.check_model(unet)
        analyses = analyze_sites(unet, stats, todo)
    tensors, errors = {}, {}
    for s in tqdm(todo, desc="decomposing", disable=not progress):
        result = decompose_site(unet, analyses[s.name], ranks[s.name], config)
        tensors.update(result.tensors)
        errors[s.name] = result.relative_error
    before = sum(p.numel() for p in unet.parameters())
    dtype = next(unet.parameters()).dtype
    apply_plan_shapes(unet, plan)
    load_slim_weights(unet, {k: v.to(dtype) for k, v in tensors.items()})
    after = sum(p.numel() for p in unet.parameters())
    if before - after != plan.params_removed:  # the plan is the contract with save/load and export
        raise SlimDiffError(f"internal error: rebuilt model removed {before - after} parameters, plan says "
                            f"{plan.params_removed}")
    unet.slim_plan = plan
    return SlimReport(plan, before, after, errors, {}, time.perf_counter() - start)


def slim_unet(unet, stats: Statistics, config: SlimConfig = SlimConfig(), progress: bool = True) -> SlimReport:
    """Slim ``unet`` in place to ``config.budget`` using calibration ``stats``; returns the plan and a report."""
    start = time.perf_counter()
    latency = config.speedup is not None
    items, analyses = allocation_items(unet, stats, config, with_curves=config.allocator == "greedy" or latency,
                                       progress=progress)
    total = sum(item.unit_cost * item.width for item in items)
    if latency:
        from .bench.latency_table import latency_budget_ranks

        ranks, info = latency_budget_ranks(items, _latency_model(unet, config), config.speedup, r_min=config.r_min,
                                           align=config.align, temperature=config.resolved_temperature())
        info = {"latency_budget": info, "latency_table": str(config.latency_table)}
    else:
        budget = config.budget * total if config.budget < 1 else config.budget
        try:
            ranks = alloc.allocate(items, budget, temperature=config.resolved_temperature(), r_min=config.r_min,
                                   align=config.align,
                                   method="greedy" if config.allocator == "greedy" else "softmax")
        except ValueError as exc:
            raise SlimDiffError(f"cannot meet the budget: {exc}") from exc
        info = {"budget_resolved": budget, "budget_total": total}
    report = apply_ranks(unet, stats, ranks, config, info, analyses, progress)
    report.scores = {item.name: item.score for item in items}
    report.seconds = time.perf_counter() - start
    return report
