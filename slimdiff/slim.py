"""The slimming driver: statistics → scores → ranks → closed-form factors → a smaller denoiser, in place.

It joins the model's layout — reached only through the block adapters of :mod:`slimdiff.families` (sites,
their Linears, typed statistics) — to the pure linear algebra of :mod:`slimdiff.analyze`,
:mod:`slimdiff.decompose` and :mod:`slimdiff.allocate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from tqdm.auto import tqdm

from . import allocate as alloc
from . import analyze, decompose
from .calibrate import Statistics, site_trq, weight64
from .checks import budget_amount, check_budget_range
from .errors import SlimDiffError
from .families import (
    FFN,
    QK,
    ColumnBlock,
    FFNLinears,
    ModuleSite,
    QKLinears,
    ResidualEnergies,
    VOLinears,
    family_for,
    module_sites,
    site_adapter,
    site_linears,
)
from .families.base import seq_key
from .latency import LatencyModel, latency_budget_ranks, load_table, proxy_items, site_geometry
from .lora_maps import LinearMaps, column_map, row_map
from .plan import RankPlan
from .rebuild import apply_plan_shapes, load_slim_weights


@dataclass(frozen=True)
class SlimConfig:
    """How much to remove and how.

    ``budget``: below 1, a fraction of the compressible mass (parameters or MACs, per ``budget_unit``);
    from 1 up, an absolute amount to remove (e.g. ``100e6`` parameters).
    ``exclude``: module-name fragments or kinds (``ffn``/``qk``/``vo``/``attn1``/``attn2``) left untouched.
    ``speedup`` with ``latency_table`` (a JSON table measured by ``bench --latency-table`` on the
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
    # keep the maps that carry a LoRA of the dense model onto the slim one (slimdiff.lora_maps); the FFN's are as
    # large as its down projection
    lora_maps: bool = False

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
    # The aggregated moments the decomposition reads, read when it runs: statistics on disk stay there until a
    # site needs them (an FFN moment of FLUX.1 is 1.2 GB; all of them would not fit).
    read_inputs: Callable[[], dict[str, torch.Tensor]]


def _weighted(per_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("t,t...->...", w, per_t)


def _decomposition_inputs(unet, stats: Statistics, site: ModuleSite, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The timestep-weighted moments the decomposition of ``site`` reads."""
    if site.kind == FFN:
        return {"moment": stats.ffn(site.sublayer_path).hidden_moment}
    attn = stats.attention(site.sublayer_path)
    lin = site_linears(unet, site)
    if site.kind == QK:
        sigma_x = attn.qk_input_moment
        inputs = {"sigma_x": sigma_x, "sigma_y": sigma_x if attn.context is None else attn.context_moment}
        if lin.q.bias is not None:  # the query bias rides on a constant-1 coordinate: E[x] is needed
            if attn.qk_input_mean is None:
                raise SlimDiffError(f"statistics lack the input mean of {site.sublayer_path}, whose query "
                                    "projection has a bias: calibrate again")
            inputs["mean_x"] = attn.qk_input_mean
        return inputs
    # a value bias is folded into the output bias: the factors act on z less that bias
    grams = attn.grams.output_grams if lin.v.bias is None else attn.grams.output_grams_less(_b(lin.v))
    return {"gram_z": _weighted(grams, weights), "sigma_v": attn.vo_input_moment}


def analyze_sites(unet, stats: Statistics, sites: list[ModuleSite]) -> dict[str, SiteAnalysis]:
    """TRQ per timestep (over every prompt), fidelity weights (from pass 1), propagation and, read on demand, the
    timestep-weighted moments each site's decomposition reads."""
    out = {}
    for site in sites:
        rho = site_trq(unet, site, stats.tensors)
        weights = stats.timestep_weights[site.name]
        record = ResidualEnergies.read(stats.tensors, site.sublayer_path)
        out[site.name] = SiteAnalysis(site, rho, weights, record.propagation,
                                      partial(_decomposition_inputs, unet, stats, site, weights))
    return out


# ----------------------------------------------------------------------------------------------------------
# Decomposition of one site
# ----------------------------------------------------------------------------------------------------------


def _b(module: torch.nn.Linear) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().double().cpu()


@dataclass
class SiteResult:
    tensors: dict[str, torch.Tensor]  # state-dict name → new value (float64, CPU)
    relative_error: float
    error_curve: torch.Tensor | None
    lora_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # slimdiff.lora_maps entries, when asked


def _site_lora_maps(site: ModuleSite, lin, rows: dict[str, dict], columns: dict[str, torch.Tensor],
                    value_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The LoRA maps of every Linear of ``site``: ``rows`` (role → row_map arguments) for the Linears whose rows
    were mapped, ``columns`` (role → (G, d, r)) for those whose input columns were (a column block's own range)."""
    out = {}
    for role, module in lin.modules().items():
        base, path = role.split(".")[0], f"{site.block}.{lin.names[role]}"
        if base in rows:
            out.update(row_map(path, **rows[base]))
        else:
            start, stop = (module.start, module.stop) if isinstance(module, ColumnBlock) else (0, module.in_features)
            out.update(column_map(path, start, stop, columns[base], value_bias))
    return out


def decompose_site(unet, analysis: SiteAnalysis, rank: int, config: SlimConfig) -> SiteResult:
    """Closed-form factors of one site at ``rank``; tensors cover every parameter of each resized Linear."""
    site = analysis.site
    lin = site_linears(unet, site)
    inputs = analysis.read_inputs()

    def parameters(role: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # the state-dict entries of the Linear(s) playing ``role`` (a joint attention's roles span its streams)
        return {f"{site.block}.{k}": v for k, v in lin.parameters_at(role, weight, bias).items()}

    if isinstance(lin, FFNLinears):
        res = decompose.ffn_decompose(
            weight64(lin.proj), _b(lin.proj), weight64(lin.down), inputs["moment"], rank,
            gated=lin.gated, ridge=config.ridge_ffn, selector=config.ffn_selector,
            correct_down=config.ffn_correction, generator=torch.Generator().manual_seed(config.seed),
            with_down_map=config.lora_maps,
        )
        tensors = {**parameters("proj", res.proj_weight, res.proj_bias),
                   **parameters("down", res.down_weight, _b(lin.down))}
        maps = {}
        if config.lora_maps:
            inner = res.down_map.shape[0]
            index = torch.cat([res.keep + half * inner for half in range(2 if lin.gated else 1)])
            maps = _site_lora_maps(site, lin, {"proj": {"index": index}}, {"down": res.down_map[None]})
        return SiteResult(tensors, float(res.relative_error), res.error_curve, maps)
    if isinstance(lin, QKLinears):
        res = decompose.qk_decompose(weight64(lin.q), weight64(lin.k), inputs["sigma_x"],
                                     inputs["sigma_y"], site.heads, rank, ridge=config.ridge_qk,
                                     selector=config.qk_method, q_bias=_b(lin.q), k_bias=_b(lin.k),
                                     mean_x=inputs.get("mean_x"))
        tensors = {**parameters("q", res.q_weight, res.q_bias), **parameters("k", res.k_weight, res.k_bias)}
        maps = {}
        if config.lora_maps:
            maps = _site_lora_maps(site, lin, {"q": {"matrix": res.q_map}, "k": {"matrix": res.k_map}}, {})
        return SiteResult(tensors, float(res.relative_error), res.error_curve, maps)
    assert isinstance(lin, VOLinears)
    v, o = weight64(lin.v), weight64(lin.out)
    if config.vo_statistic == "output":
        gram = inputs["gram_z"]
    elif config.vo_statistic == "value":
        gram = decompose.value_gram(v, inputs["sigma_v"], site.heads)
    else:
        gram = None
    res = decompose.vo_decompose(v, o, gram, site.heads, rank, ridge=config.ridge_vo, v_bias=_b(lin.v),
                                 o_bias=_b(lin.out))
    tensors = {**parameters("v", res.v_weight, res.v_bias),
               **parameters("out", res.o_weight, _b(lin.out) if res.o_bias is None else res.o_bias)}
    maps = {}
    if config.lora_maps:
        maps = _site_lora_maps(site, lin, {"v": {"matrix": res.v_map}}, {"out": res.o_map},
                               value_bias=None if res.o_bias is None else _b(lin.v))
    return SiteResult(tensors, float(res.relative_error), res.error_curve, maps)


# ----------------------------------------------------------------------------------------------------------
# Costs, allocation, rebuild
# ----------------------------------------------------------------------------------------------------------


def unit_macs(unet, site: ModuleSite, stats: Statistics) -> int:
    """MACs per sample per denoiser call removed when the site's rank drops by one (linears + attention
    products), priced by the site's block adapter from the token counts calibration saw."""
    block, adapter = site_adapter(unet, site)

    def tokens(sublayer: str) -> tuple[int, int]:
        path = f"{site.block}.{sublayer}"
        if seq_key(path) not in stats.tensors:
            raise SlimDiffError(f"statistics have no token count of {path}: calibrate again with this slimdiff")
        query = int(stats.tensors[seq_key(path)])
        context = stats.tensors.get(seq_key(path, context=True))
        return query, query if context is None else int(context)

    return adapter.unit_macs(block, site, tokens)


def _excluded(site: ModuleSite, patterns: tuple[str, ...]) -> bool:
    return any(p == site.kind or p in site.name for p in patterns)


def _pool(unet, exclude: tuple[str, ...]) -> list[ModuleSite]:
    """The sites slimming may resize: all but the excluded; one line for a pattern that excludes nothing (a typo
    would silently slim what the user meant to keep)."""
    sites = module_sites(unet)
    for pattern in exclude:
        if not any(_excluded(s, (pattern,)) for s in sites):
            raise SlimDiffError(f"exclude pattern {pattern!r} matches no compressible module: give a kind ("
                                f"{', '.join(sorted({s.kind for s in sites}))}) or a fragment of a module name such as "
                                f"{sites[0].name!r}")
    return [s for s in sites if not _excluded(s, exclude)]


def _latency_model(unet, config: SlimConfig, family=None) -> LatencyModel:
    return LatencyModel(load_table(config.latency_table), unet, family=family)


def refuse_slim_denoiser(unet) -> None:
    """A denoiser slimdiff has slimmed (a slim folder's, or one slimmed in place) is not slimmed again: its plan
    and its source's provenance would not describe the result (the saved folder failed to reopen), and new
    factors fitted to the first ones' approximations lose more than one plan at the total budget."""
    plan = getattr(unet, "slim_plan", None)
    if plan is None:
        return
    origin = plan.info.get("source_model")
    raise SlimDiffError(f"this {type(unet).__name__} is slim already"
                        f"{f' (slimmed from {origin})' if origin else ''}: slim "
                        f"{origin if origin else 'the dense model it came from'} instead, with the budget you want in "
                        "all (its statistics serve again: --stats)")


def check_budget(unet, config: SlimConfig, family=None, call: tuple[tuple[int, int], int] | None = None) -> None:
    """Refuse a slim denoiser, a parameter budget the pool cannot give, or a latency table of another architecture or
    call (``family`` calls ``unet``: default its own), before a calibration that can take hours. A MAC budget is
    priced by the token counts calibration sees: checked here when ``call`` = (latent size, text tokens) says what
    they will be (:func:`mac_costs_of_call`), else only after calibration."""
    refuse_slim_denoiser(unet)
    pool = _pool(unet, config.exclude)
    if config.speedup is not None:
        # Whether the target is reachable depends on the table alone (every module at its floor), not on the
        # error curves that calibration would bring.
        latency_budget_ranks(proxy_items(unet), _latency_model(unet, config, family), config.speedup, r_min=config.r_min,
                             align=config.align)
        return
    if config.budget_unit == "macs" and call is not None:
        costs = mac_costs_of_call(unet, pool, family, *call)
        budget = budget_amount(config.budget, sum(width * cost for width, cost in costs))
        try:  # 1 % of slack: the statistics' token counts decide in the end; this only spares a hopeless calibration
            check_budget_range(budget, costs, config.r_min, config.align, unit="MACs", slack=1.01)
        except SlimDiffError as exc:
            raise SlimDiffError(f"{exc} (priced at a call at latent {call[0][0]}×{call[0][1]}, before "
                                "calibrating)") from None
        return
    if config.budget_unit != "params":
        return
    budget = budget_amount(config.budget, sum(s.params for s in pool))
    check_budget_range(budget, [(s.width, s.unit_params) for s in pool], config.r_min, config.align)


def mac_costs_of_call(unet, pool: list[ModuleSite], family, latent: tuple[int, int], text_len: int
                      ) -> list[tuple[int, int]]:
    """(width, MACs per sample per call removed per unit of rank) of every site in ``pool`` for a call of ``unet``
    at ``latent`` with ``text_len`` text tokens, as ``family`` calls it: what :func:`unit_macs` reads off the
    statistics, from the architecture alone (a meta-device forward)."""
    geometry = site_geometry(unet, latent, text_len, family)
    tokens_of = {s.sublayer_path: (geometry[s.name].tokens, geometry[s.name].context_tokens)
                 for s in module_sites(unet)}
    costs = []
    for site in pool:
        block, adapter = site_adapter(unet, site)
        costs.append((site.width, adapter.unit_macs(block, site, lambda sub, b=site.block: tokens_of[f"{b}.{sub}"])))
    return costs


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
    pool = _pool(unet, config.exclude)
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
    tensors, errors, maps = {}, {}, {}
    dtype = next(unet.parameters()).dtype
    for s in tqdm(todo, desc="decomposing", disable=not progress):
        result = decompose_site(unet, analyses[s.name], ranks[s.name], config)
        # in the model's dtype as they come: the float64 factors of every site at once would be twice a float32
        # model's transformer weights
        tensors.update({k: v.to(dtype) for k, v in result.tensors.items()})
        maps.update({k: v if v.dtype == torch.int64 else v.to(torch.float32) for k, v in result.lora_maps.items()})
        errors[s.name] = result.relative_error
    before = sum(p.numel() for p in unet.parameters())
    apply_plan_shapes(unet, plan)
    load_slim_weights(unet, tensors)
    after = sum(p.numel() for p in unet.parameters())
    if before - after != plan.params_removed:  # the plan is the contract with save/load and export
        raise SlimDiffError(f"internal error: rebuilt model removed {before - after} parameters, plan says "
                            f"{plan.params_removed}")
    unet.slim_plan = plan
    unet.slim_lora_maps = LinearMaps(maps) if config.lora_maps else None
    return SlimReport(plan, before, after, errors, {}, time.perf_counter() - start)


def slim_unet(unet, stats: Statistics, config: SlimConfig = SlimConfig(), progress: bool = True,
              family=None) -> SlimReport:
    """Slim ``unet`` in place to ``config.budget`` using calibration ``stats``; returns the plan and a report.
    ``family`` calls ``unet`` in its pipeline (default the denoiser's own): a latency budget prices its call, and the
    plan records it — what an export of the slim folder alone takes the call from (FLUX Kontext's transformer has
    FLUX.1-dev's configuration)."""
    refuse_slim_denoiser(unet)
    family = family or family_for(unet)
    start = time.perf_counter()
    latency = config.speedup is not None
    items, analyses = allocation_items(unet, stats, config, with_curves=config.allocator == "greedy" or latency,
                                       progress=progress)
    total = sum(item.unit_cost * item.width for item in items)
    if latency:
        ranks, info = latency_budget_ranks(items, _latency_model(unet, config, family), config.speedup,
                                           r_min=config.r_min,
                                           align=config.align, temperature=config.resolved_temperature())
        info = {"latency_budget": info, "latency_table": str(config.latency_table)}
    else:
        budget = budget_amount(config.budget, total)
        check_budget_range(budget, [(item.width, item.unit_cost) for item in items], config.r_min, config.align,
                           unit=config.budget_unit.replace("params", "parameters").replace("macs", "MACs"))
        try:
            ranks = alloc.allocate(items, budget, temperature=config.resolved_temperature(), r_min=config.r_min,
                                   align=config.align,
                                   method="greedy" if config.allocator == "greedy" else "softmax")
        except ValueError as exc:
            raise SlimDiffError(f"cannot meet the budget: {exc}") from exc
        info = {"budget_resolved": budget, "budget_total": total}
    report = apply_ranks(unet, stats, ranks, config, {**info, "family": family.name}, analyses, progress)
    report.scores = {item.name: item.score for item in items}
    report.seconds = time.perf_counter() - start
    return report
