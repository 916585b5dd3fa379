"""Stage E: budgets, alignment, floors, uniform limit, score monotonicity and the greedy allocator."""

import math

import pytest
import torch

from slimdiff.allocate import AllocationItem, allocate, removed_cost

ALIGN, R_MIN = 8, 8


def _sd_like_pool(seed=0, with_curves=False):
    """FFN, self- and cross-attention modules at SD-v1 widths and parameter costs, random scores in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        ("ffn320", 1280, 3 * 320 + 2), ("ffn640", 2560, 3 * 640 + 2), ("ffn1280", 5120, 3 * 1280 + 2),
        ("qk_self320", 40, 16 * 320), ("vo_self640", 80, 16 * 640), ("qk_cross1280", 160, 8 * (1280 + 768)),
        ("vo_cross320", 40, 8 * (320 + 768)), ("qk_self1280", 162, 16 * 1280),  # a width off the alignment grid
    ]
    scores = torch.rand(len(shapes), generator=gen, dtype=torch.float64)
    scores = (scores - scores.min()) / (scores.max() - scores.min())
    items = []
    for (name, width, cost), score in zip(shapes, scores.tolist()):
        curve = None
        if with_curves:  # decreasing error in the retained width, convex like a spectrum tail
            spectrum = torch.rand(width, generator=gen, dtype=torch.float64).sort(descending=True).values ** 3
            curve = torch.cat([spectrum.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        items.append(AllocationItem(name, width, float(cost), score, curve))
    return items


def _removable(items):
    return sum(item.unit_cost * (item.width - min(R_MIN, item.width)) for item in items)


def _assert_on_grid(items, ranks):
    for item in items:
        rank = ranks[item.name]
        assert R_MIN <= rank <= item.width
        assert rank % ALIGN == 0 or rank == item.width, (item.name, rank)


@pytest.mark.parametrize("method", ["softmax", "greedy"])
@pytest.mark.parametrize("temperature", [0.02, 0.1, 0.5, math.inf])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.95])
def test_budget_is_met_within_one_alignment_step_on_the_grid(method, temperature, fraction):
    items = _sd_like_pool(seed=1, with_curves=True)
    budget = fraction * _removable(items)
    ranks = allocate(items, budget, temperature=temperature, r_min=R_MIN, align=ALIGN, method=method)
    assert set(ranks) == {item.name for item in items}
    _assert_on_grid(items, ranks)
    largest_step = max(ALIGN * item.unit_cost for item in items)
    assert abs(removed_cost(items, ranks) - budget) <= largest_step


def test_infinite_temperature_removes_the_same_fraction_everywhere():
    items = [AllocationItem(f"m{i}", width, cost, score)
             for i, (width, cost, score) in enumerate([(64, 3.0, 0.0), (128, 5.0, 1.0), (320, 7.0, 0.4)])]
    budget = 0.5 * sum(item.width * item.unit_cost for item in items)
    ranks = allocate(items, budget, temperature=math.inf, r_min=R_MIN, align=ALIGN)
    assert ranks == {"m0": 32, "m1": 64, "m2": 160}
    assert removed_cost(items, ranks) == budget


def test_higher_score_keeps_at_least_as_much_width():
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(10, generator=gen, dtype=torch.float64).tolist()
    items = [AllocationItem(f"m{i}", 320, 1.0, s) for i, s in enumerate(scores)]
    by_score = sorted(items, key=lambda item: item.score)
    for temperature in (0.05, 0.2, 1.0):
        for fraction in (0.2, 0.5, 0.8):
            ranks = allocate(items, fraction * _removable(items), temperature=temperature)
            kept = [ranks[item.name] for item in by_score]
            assert kept == sorted(kept), (temperature, fraction, kept)
            assert kept[0] < kept[-1]


def test_softmax_fractions_follow_the_closed_form_and_respect_caps():
    scores = [0.0, 0.5, 1.0]
    items = [AllocationItem(f"m{i}", 10_000, 1.0, s) for i, s in enumerate(scores)]
    temperature = 0.5
    ranks = allocate(items, 4_000, temperature=temperature, r_min=1, align=1)
    removed = [1 - ranks[f"m{i}"] / 10_000 for i in range(3)]
    for i in (1, 2):
        assert removed[0] / removed[i] == pytest.approx(math.exp((scores[i] - scores[0]) / temperature), rel=1e-2)
    # a cold temperature with a large budget saturates the least important module at its floor (water-filling)
    ranks = allocate(items, 15_000, temperature=0.05, r_min=8, align=8)
    assert ranks["m0"] == 8 and ranks["m1"] > 8 and ranks["m2"] > ranks["m1"]


def test_per_item_floors_and_removal_caps_are_respected():
    items = [
        AllocationItem("floored", 160, 10.0, 0.0, min_rank=40),
        AllocationItem("capped", 320, 10.0, 0.0, max_removal=0.25),
        AllocationItem("free", 320, 10.0, 1.0),
        AllocationItem("tiny", 4, 10.0, 0.0),  # narrower than r_min: the floor is clipped to the width
    ]
    removable = 10.0 * ((160 - 40) + 80 + (320 - 8))
    for method in ("softmax", "greedy"):
        curves = {item.name: torch.linspace(1.0, 0.0, item.width + 1, dtype=torch.float64) for item in items}
        with_curves = [AllocationItem(i.name, i.width, i.unit_cost, i.score, curves[i.name], i.min_rank,
                                      i.max_removal) for i in items]
        ranks = allocate(with_curves, 0.9 * removable, temperature=0.05, method=method)
        assert ranks["floored"] >= 40 and ranks["capped"] >= 240 and ranks["tiny"] == 4
    with pytest.raises(ValueError, match="removable"):
        allocate(items, removable)


def test_greedy_strips_the_modules_whose_error_grows_slowest():
    flat = torch.linspace(1e-3, 0.0, 65, dtype=torch.float64)
    flat[0] = 1.0  # nearly all the error sits in the very last unit
    steep = torch.linspace(1.0, 0.0, 65, dtype=torch.float64) ** 0.2
    items = [AllocationItem("steep", 64, 1.0, 0.5, steep), AllocationItem("flat", 64, 1.0, 0.5, flat)]
    ranks = allocate(items, 48, method="greedy", temperature=math.inf)
    assert ranks == {"steep": 64, "flat": 16}
    # a strong score weight overrides a cheaper error: the important module keeps its width
    items = [AllocationItem("steep", 64, 1.0, 0.0, steep), AllocationItem("flat", 64, 1.0, 1.0, flat)]
    assert allocate(items, 48, method="greedy", temperature=0.01) == {"steep": 16, "flat": 64}


@pytest.mark.parametrize("budget", [0.0, -5.0, 1.0e30])
def test_infeasible_budgets_raise(budget):
    items = _sd_like_pool()
    with pytest.raises(ValueError, match="budget"):
        allocate(items, budget)


def test_invalid_configurations_raise():
    items = _sd_like_pool()
    with pytest.raises(ValueError, match="removable"):
        allocate(items, _removable(items))
    with pytest.raises(ValueError, match="error curve"):
        allocate(items, 0.5 * _removable(items), method="greedy")
    with pytest.raises(ValueError, match="method"):
        allocate(items, 0.5 * _removable(items), method="latency")
    with pytest.raises(ValueError, match="temperature"):
        allocate(items, 0.5 * _removable(items), temperature=0.0)
    with pytest.raises(ValueError, match="unique"):
        allocate(items + items[:1], 0.5 * _removable(items))


def test_removed_cost_counts_cost_per_unit_of_width():
    items = [AllocationItem("a", 64, 2.0, 0.0), AllocationItem("b", 40, 10.0, 1.0)]
    assert removed_cost(items, {"a": 32, "b": 40}) == 64.0
    assert removed_cost(items, {"a": 64, "b": 8}) == 320.0
