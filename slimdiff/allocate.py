"""Stage E — automatic rank allocation under one global budget (method.md §7).

Every module m offers a width n_m (FFN neurons, or per-head rank of an attention pair) at a cost c_m per unit
(parameters, or MACs for a compute budget), and carries a normalised importance score ŝ_m ∈ [0, 1]. Given the
budget B — the total cost to remove — the allocator returns one retained width r_m per module such that
Σ_m c_m (n_m − r_m) ≈ B within one alignment step.

Methods:
* "softmax" — the entropic program max Σ P_m[−ŝ_m φ_m − ε φ_m log φ_m] s.t. Σ P_m φ_m = B, 0 ≤ φ_m ≤ φ_max,
  whose solution is φ_m = min(φ_max, κ e^{−ŝ_m/ε}) (P_m = c_m n_m; κ by bisection; water-filling handles
  the caps); ε = ∞ gives one uniform removal fraction. Rounded up to the alignment grid, then repaired.
* "greedy" — on each module's closed-form error curve: repeatedly take the next alignment step with the smallest
  score-weighted relative error increase per unit of cost removed.

A latency budget would be one more ``method`` over the same items (with ``unit_cost`` in the budget's unit).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from torch import Tensor

METHODS = ("softmax", "greedy")
_BISECTION_STEPS = 200


@dataclass(frozen=True, eq=False)
class AllocationItem:
    """One module of the allocation pool.

    name: unique key of the result.  width: n_m, the full width.  unit_cost: c_m, cost removed per unit of width.
    score: ŝ_m ∈ [0, 1], higher means more important (keeps more width).
    error_curve: (n_m+1,) closed-form error at every retained width (required by the "greedy" method).
    min_rank: overrides the allocator's r_min for this module (e.g. a per-type floor).
    max_removal: largest fraction of the width that may be removed, in [0, 1].
    """

    name: str
    width: int
    unit_cost: float
    score: float
    error_curve: Tensor | None = None
    min_rank: int | None = None
    max_removal: float | None = None


def removed_cost(items: list[AllocationItem], ranks: dict[str, int]) -> float:
    """Σ_m c_m (n_m − r_m): the cost the ranks remove."""
    return sum(item.unit_cost * (item.width - ranks[item.name]) for item in items)


def allocate(
    items: list[AllocationItem],
    budget: float,
    *,
    temperature: float = 0.1,
    r_min: int = 8,
    align: int = 8,
    method: str = "softmax",
) -> dict[str, int]:
    """Retained width per module name, removing ``budget`` cost in total within one alignment step.

    Ranks lie on each module's grid: its floor max(r_min or min_rank, width·(1 − max_removal)) clipped to the
    width, the multiples of ``align`` above the floor, and the full width. ``temperature`` is ε of the softmax
    program; the greedy method weights error increases by e^{ŝ/ε} (ε = ∞: unweighted). Raises ValueError when
    the budget is not strictly between 0 and the removable mass Σ c_m (n_m − floor_m).
    """
    if method not in METHODS:
        raise ValueError(f"unknown allocation method {method!r}; choose one of {METHODS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive (inf for uniform), got {temperature}")
    if align < 1 or r_min < 1:
        raise ValueError(f"align and r_min must be at least 1, got align={align}, r_min={r_min}")
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise ValueError("allocation items must have unique names")
    for item in items:
        if item.width < 1 or not item.unit_cost > 0 or not math.isfinite(item.score):
            raise ValueError(f"{item.name}: width and unit cost must be positive and the score finite")
    grids = {item.name: _rank_grid(item, r_min, align) for item in items}
    removable = sum(item.unit_cost * (item.width - grids[item.name][0]) for item in items)
    if not 0 < budget < removable:
        raise ValueError(
            f"budget {budget:.6g} must lie strictly between 0 and the removable mass {removable:.6g} "
            f"(every module at its minimum rank)"
        )
    if method == "greedy":
        return _greedy(items, grids, budget, temperature)
    fractions = _softmax_fractions(items, grids, budget, temperature)
    targets = {item.name: item.width * (1.0 - fractions[item.name]) for item in items}
    ranks = {}
    for item in items:
        aligned = align * math.ceil(targets[item.name] / align - 1e-9)
        ranks[item.name] = min(item.width, max(grids[item.name][0], aligned))
    return _repair(items, grids, ranks, budget, targets)


def _rank_grid(item: AllocationItem, r_min: int, align: int) -> list[int]:
    """Allowed retained widths of a module, ascending: its floor, aligned widths above it, the full width."""
    floor = item.min_rank if item.min_rank is not None else r_min
    if item.max_removal is not None:
        if not 0 <= item.max_removal <= 1:
            raise ValueError(f"{item.name}: max_removal must lie in [0, 1], got {item.max_removal}")
        floor = max(floor, math.ceil(item.width * (1.0 - item.max_removal) - 1e-9))
    floor = min(floor, item.width)
    first_aligned = align * (floor // align + 1)
    return [floor, *range(first_aligned, item.width, align), *([item.width] if floor < item.width else [])]


def _softmax_fractions(
    items: list[AllocationItem], grids: dict[str, list[int]], budget: float, temperature: float
) -> dict[str, float]:
    """φ_m = min(φ_max,m, κ e^{−ŝ_m/ε}) with κ such that Σ_m P_m φ_m = budget (bisection on log κ)."""
    live = [item for item in items if grids[item.name][0] < item.width]
    mass = {item.name: item.unit_cost * item.width for item in live}
    cap = {item.name: 1.0 - grids[item.name][0] / item.width for item in live}
    # log φ before capping is log κ − ŝ/ε; working in logs keeps small temperatures from underflowing.
    exponent = {item.name: -item.score / temperature for item in live}

    def removed(log_kappa: float) -> float:
        return sum(mass[n] * min(cap[n], math.exp(min(0.0, log_kappa + exponent[n]))) for n in mass)

    # At `low` the uncapped sum equals the budget (so the capped one is at most it); at `high` every module is
    # capped, which removes more than the budget.
    shifts = [math.log(mass[n]) + exponent[n] for n in mass]
    peak = max(shifts)
    low = math.log(budget) - peak - math.log(sum(math.exp(s - peak) for s in shifts))
    high = max(math.log(cap[n]) - exponent[n] for n in mass)
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if removed(middle) < budget:
            low = middle
        else:
            high = middle
    log_kappa = 0.5 * (low + high)
    fractions = {item.name: 0.0 for item in items}
    fractions.update({n: min(cap[n], math.exp(min(0.0, log_kappa + exponent[n]))) for n in mass})
    return fractions


def _repair(
    items: list[AllocationItem], grids: dict[str, list[int]], ranks: dict[str, int], budget: float,
    targets: dict[str, float],
) -> dict[str, int]:
    """Move one grid step at a time until the removed cost is within one step of the budget.

    Short of the budget: shrink the module furthest above its target width (relative to its width), the least
    important first among equals. Past it: restore the module furthest below its target, the most important
    first. Spreading the steps this way keeps rounding from stripping one module to its floor when scores tie.
    Each move heads towards the budget, so the loop terminates.
    """
    position = {item.name: grids[item.name].index(ranks[item.name]) for item in items}
    removed = removed_cost(items, ranks)

    def excess(i: int) -> float:
        item = items[i]
        return (ranks[item.name] - targets[item.name]) / item.width

    while True:
        gap = budget - removed
        if gap == 0:
            return ranks
        # A feasible budget (0 < B < removable mass) guarantees a candidate: short of B some module is above its
        # floor, past B some module is below its full width.
        direction = -1 if gap > 0 else 1
        movable = [i for i in range(len(items)) if 0 <= position[items[i].name] + direction < len(grids[items[i].name])]
        if gap > 0:
            item = items[max(movable, key=lambda i: (excess(i), -items[i].score, -i))]
        else:
            item = items[min(movable, key=lambda i: (excess(i), -items[i].score, i))]
        grid, here = grids[item.name], position[item.name]
        step = item.unit_cost * abs(grid[here + direction] - grid[here])
        if step >= 2 * abs(gap):  # the step would land further from the budget than we are
            return ranks
        position[item.name] = here + direction
        ranks[item.name] = grid[here + direction]
        removed -= direction * step
        if abs(gap) <= step:
            return ranks


def _greedy(
    items: list[AllocationItem], grids: dict[str, list[int]], budget: float, temperature: float
) -> dict[str, int]:
    """Take the cheapest next step (score-weighted relative error per cost) until the budget is reached."""
    for item in items:
        if item.error_curve is None or tuple(item.error_curve.shape) != (item.width + 1,):
            raise ValueError(f"{item.name}: the greedy allocator needs an error curve of length width+1")
    curves = {item.name: [float(e) for e in item.error_curve] for item in items}
    ranks = {item.name: item.width for item in items}
    position = {item.name: len(grids[item.name]) - 1 for item in items}
    offers: list[tuple[float, int, float, int]] = []

    def offer(index: int) -> None:
        item = items[index]
        grid, here = grids[item.name], position[item.name]
        if here == 0:
            return
        curve = curves[item.name]
        increase = (curve[grid[here - 1]] - curve[grid[here]]) / curve[0] if curve[0] > 0 else 0.0
        cost = item.unit_cost * (grid[here] - grid[here - 1])
        # log(e^{ŝ/ε}·Δerror/Δcost): logs keep tiny temperatures finite; a free step sorts first.
        priority = math.log(increase / cost) + item.score / temperature if increase > 0 else -math.inf
        heapq.heappush(offers, (priority, item.score, cost, index))

    for index in range(len(items)):
        offer(index)
    removed = 0.0
    while removed < budget and offers:
        _, _, cost, index = heapq.heappop(offers)
        if removed + cost - budget > budget - removed:  # overshooting further than stopping short
            break
        item = items[index]
        position[item.name] -= 1
        ranks[item.name] = grids[item.name][position[item.name]]
        removed += cost
        offer(index)
    return ranks
