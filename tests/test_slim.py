"""The slimming driver on builtin:tiny: wiring of statistics → decompositions → rebuilt UNet."""

import pytest
import torch

from slimdiff.errors import SlimDiffError
from slimdiff.models import build_builtin, module_sites
from slimdiff.rebuild import load_slim_weights
from slimdiff.slim import SlimConfig, analyze_sites, decompose_site, parse_budget, slim_unet

INPUTS = lambda: (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500),
                  torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1)))


def test_full_rank_through_the_driver_reproduces_the_unet(tiny_pipe, tiny_stats):
    unet = tiny_pipe.unet
    x, t, e = INPUTS()
    ref = unet(x, t, e).sample
    sites = module_sites(unet)
    analyses = analyze_sites(unet, tiny_stats, sites)
    tensors = {}
    for s in sites:
        result = decompose_site(unet, analyses[s.name], s.width, SlimConfig())
        assert result.relative_error < 1e-9, s.name
        tensors.update(result.tensors)
    load_slim_weights(unet, {k: v.float() for k, v in tensors.items()})
    assert torch.allclose(unet(x, t, e).sample, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("allocator", ["softmax", "greedy", "uniform"])
def test_budget_is_met_and_plan_is_exact(tiny_pipe, tiny_stats, allocator):
    unet = tiny_pipe.unet
    x, t, e = INPUTS()
    ref = unet(x, t, e).sample
    before = sum(p.numel() for p in unet.parameters())
    report = slim_unet(unet, tiny_stats, SlimConfig(budget=0.4, allocator=allocator), progress=False)
    plan = report.plan
    step = max(8 * m.unit_params for m in plan.modules.values())
    assert abs(plan.params_removed - 0.4 * plan.compressible_params) <= step
    assert before - sum(p.numel() for p in unet.parameters()) == plan.params_removed
    for entry in plan.modules.values():
        assert entry.rank == entry.width or (entry.rank % 8 == 0 and entry.rank >= 8)
    out = unet(x, t, e).sample
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1.0


def test_macs_budget_and_exclusions(tiny_pipe, tiny_stats):
    unet = tiny_pipe.unet
    report = slim_unet(unet, tiny_stats, SlimConfig(budget=0.3, budget_unit="macs", exclude=("attn2",)),
                       progress=False)
    assert report.plan.params_removed > 0
    for name, entry in report.plan.modules.items():
        if ".attn2." in name:
            assert entry.rank == entry.width


def test_budgets_and_configs():
    assert parse_budget("0.4") == 0.4 and parse_budget("100M") == 100e6 and parse_budget("2k") == 2000
    for bad in ("0", "-1", "x", ""):
        with pytest.raises(SlimDiffError):
            parse_budget(bad)
    with pytest.raises(SlimDiffError):
        SlimConfig(allocator="magic")


def test_budget_beyond_the_compressible_mass_is_refused(tiny_stats):
    unet = build_builtin("builtin:tiny").unet
    with pytest.raises(SlimDiffError, match="budget"):
        slim_unet(unet, tiny_stats, SlimConfig(budget=10e6), progress=False)
    with pytest.raises(SlimDiffError, match="budget"):
        slim_unet(unet, tiny_stats, SlimConfig(budget=0.999), progress=False)


def test_temperature_defaults_per_allocator():
    import math

    assert SlimConfig(allocator="softmax").resolved_temperature() == 0.1
    assert SlimConfig(allocator="greedy").resolved_temperature() == math.inf
    assert SlimConfig(allocator="uniform", temperature=0.3).resolved_temperature() == math.inf
    assert SlimConfig(allocator="greedy", temperature=0.2).resolved_temperature() == 0.2
    with pytest.raises(SlimDiffError, match="temperature"):
        SlimConfig(temperature=0.0)
