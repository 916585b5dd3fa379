"""Latency table model and the latency-budget allocator, on synthetic tables (no timing is asserted)."""

import math

import pytest
import torch

from slimdiff.allocate import AllocationItem
from slimdiff.bench.latency_table import (TABLE_FORMAT, LatencyModel, latency_budget_ranks, load_table, proxy_items,
                                          rank_grid, save_table, separability, site_geometry,
                                          time_breakdown)
from slimdiff.bench.timing import summarize
from slimdiff.errors import SlimDiffError
from slimdiff.models import FFN, module_sites
from slimdiff.families import QK, VO

LATENT = (16, 16)
TEXT_LEN = 77


def _table(unet, ffn_ms_per_unit, attn_ms_per_unit, other_ms=10.0, untied_penalty=0.0):
    """A table whose sub-layer latencies are linear in width: ffn a·r, attention b·(r_qk + r_vo) (+ a
    penalty when they differ); the dense UNet = their sum over sites + ``other_ms``."""
    geo = site_geometry(unet, LATENT, TEXT_LEN)
    groups, dense = {}, other_ms
    with_qk = {s.sublayer_path for s in module_sites(unet) if s.kind == QK}
    for s in module_sites(unet):
        g = geo[s.name]
        if s.kind == FFN:
            grid = rank_grid(s.width, 16, 6)
            a = ffn_ms_per_unit(g)
            curve = {"ffn": {"ranks": grid, "ms": [a * r for r in grid]}}
            dense += a * s.width
        elif s.kind == "qk":
            grid = rank_grid(s.width, 8, 6)
            b = attn_ms_per_unit(g)
            ms = [[b * (q + v) + (untied_penalty if q != v else 0.0) for v in grid] for q in grid]
            curve = {"attention": {"ranks": grid, "ms": ms}}
            dense += 2 * b * s.width
        elif s.sublayer_path not in with_qk:  # q·k normalised per head (FLUX): the v widths alone
            grid = rank_grid(s.width, 8, 6)
            b = attn_ms_per_unit(g)
            curve = {"attention_vo": {"ranks": grid, "ms": [b * v for v in grid]}}
            dense += b * s.width
        else:
            continue
        groups.setdefault(g.key, {"key": g.key, "kind": g.kind, "tokens": g.tokens, "curves": curve,
                                  "sites": []})["sites"].append(s.sublayer_path)
    return {"format": TABLE_FORMAT, "latent": list(LATENT), "text_len": TEXT_LEN, "batch": 1, "engine": "eager",
            "dense_unet_ms": dense, "groups": list(groups.values())}


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-flux"])
def test_prediction_is_exact_for_a_linear_table(model):
    from slimdiff.models import build_builtin

    pipe = build_builtin(model)
    unet = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    table = _table(unet, lambda g: 1e-3 * g.tokens, lambda g: 2e-3 * g.tokens)
    model = LatencyModel(table, unet)
    sites = module_sites(unet)
    assert model.predict_ms({}) == pytest.approx(table["dense_unet_ms"])
    geo = site_geometry(unet, LATENT, TEXT_LEN)
    ranks = {s.name: s.width // 2 for s in sites}
    saved = sum((s.width - s.width // 2) * (1e-3 if s.kind == FFN else 2e-3) * geo[s.name].tokens for s in sites)
    assert model.predict_ms(ranks) == pytest.approx(table["dense_unet_ms"] - saved)


@pytest.mark.parametrize("target", [1.1, 1.3, 1.6])
def test_latency_allocator_meets_its_target_with_little_slack(tiny_pipe, target):
    unet = tiny_pipe.unet
    table = _table(unet, lambda g: 1e-3 * g.tokens, lambda g: 4e-3 * g.tokens)
    model = LatencyModel(table, unet)
    ranks, info = latency_budget_ranks(proxy_items(unet), model, target)
    assert model.predict_speedup(ranks) >= target
    assert info["predicted_speedup"] == pytest.approx(model.predict_speedup(ranks))
    sites = {s.name: s for s in module_sites(unet)}
    assert all(8 <= r <= sites[n].width and (r % 8 == 0 or r == sites[n].width) for n, r in ranks.items())
    # Little slack: undoing the single largest one-step saving falls short of the target.
    biggest = max(model.saving_ms(n, r) - model.saving_ms(n, min(sites[n].width, r + 8))
                  for n, r in ranks.items() if r < sites[n].width)
    assert model.dense_ms / (model.predict_ms(ranks) + biggest) < target * (1 + 1e-9) or biggest == 0


def test_latency_allocator_cuts_where_time_is_not_where_parameters_are(tiny_pipe):
    unet = tiny_pipe.unet
    # Only the high-resolution attention costs time: an allocator on latency must cut it first.
    top = max(g.tokens for g in site_geometry(unet, LATENT, TEXT_LEN).values())
    table = _table(unet, lambda g: 1e-6, lambda g: 1e-2 if g.tokens == top else 1e-6)
    model = LatencyModel(table, unet)
    ranks, _ = latency_budget_ranks(proxy_items(unet), model, 1.05)
    geo = site_geometry(unet, LATENT, TEXT_LEN)
    sites = module_sites(unet)
    cut_top = [ranks[s.name] < s.width for s in sites if s.kind != FFN and geo[s.name].tokens == top]
    untouched_ffn = [ranks[s.name] == s.width for s in sites if s.kind == FFN]
    assert any(cut_top) and all(untouched_ffn)


def test_error_curves_steer_the_latency_allocator(tiny_pipe):
    unet = tiny_pipe.unet
    table = _table(unet, lambda g: 1e-3 * g.tokens, lambda g: 1e-3 * g.tokens)
    model = LatencyModel(table, unet)
    sites = module_sites(unet)
    # FFNs lose nothing when cut, attention loses a lot: the allocator takes the time from the FFNs.
    items = [AllocationItem(s.name, s.width, 1.0, 0.0,
                            torch.linspace(1.0, 0.0, s.width + 1, dtype=torch.float64) ** (8 if s.kind == FFN else 1))
             for s in sites]
    ranks, _ = latency_budget_ranks(items, model, 1.05)
    ffn_cut = sum(s.width - ranks[s.name] for s in sites if s.kind == FFN)
    attn_cut = sum(s.width - ranks[s.name] for s in sites if s.kind != FFN)
    assert ffn_cut > 0 and attn_cut == 0


def test_unreachable_target_raises(tiny_pipe):
    unet = tiny_pipe.unet
    table = _table(unet, lambda g: 1e-6, lambda g: 1e-6, other_ms=100.0)
    with pytest.raises(SlimDiffError, match="out of reach"):
        latency_budget_ranks(proxy_items(unet), LatencyModel(table, unet), 1.5)
    with pytest.raises(SlimDiffError):
        latency_budget_ranks(proxy_items(unet), LatencyModel(table, unet), 0.9)


def test_separability_reports_untied_width_penalties(tiny_pipe):
    unet = tiny_pipe.unet
    assert max(separability(_table(unet, lambda g: 1e-3, lambda g: 1e-3)).values()) == pytest.approx(0, abs=1e-12)
    assert min(separability(_table(unet, lambda g: 1e-3, lambda g: 1e-3, untied_penalty=5.0)).values()) > 0


def test_table_save_load_round_trip_and_validation(tiny_pipe, tmp_path):
    table = _table(tiny_pipe.unet, lambda g: 1e-3, lambda g: 1e-3)
    path = save_table(table, tmp_path / "t.json")
    assert load_table(path) == table
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(SlimDiffError):
        load_table(tmp_path / "bad.json")


def test_rank_grid_keeps_ends_and_alignment():
    assert rank_grid(40, 8, 10) == [8, 16, 24, 32, 40]
    grid = rank_grid(5120, 64, 9)
    assert len(grid) == 9 and grid[0] == 64 and grid[-1] == 5120 and all(r % 64 == 0 for r in grid)
    assert rank_grid(42, 8, 10)[-1] == 42


def test_timing_summary_uses_observed_values():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0], 3, "perf_counter")
    assert (t.median_ms, t.p90_ms, t.min_ms, t.max_ms, t.n) == (5.5, 9.0, 1.0, 10.0, 10)
    assert math.isclose(t.mean_ms, 5.5)


def test_slim_unet_with_a_latency_budget(tiny_pipe, tiny_stats, tmp_path):
    from slimdiff.plan import RankPlan
    from slimdiff.slim import SlimConfig, check_budget, slim_unet

    unet = tiny_pipe.unet
    table = _table(unet, lambda g: 1e-3 * g.tokens, lambda g: 4e-3 * g.tokens)
    path = save_table(table, tmp_path / "table.json")
    model = LatencyModel(table, unet)  # of the dense architecture, before slimming in place
    config = SlimConfig(speedup=1.3, latency_table=str(path))
    check_budget(unet, config)
    before = sum(p.numel() for p in unet.parameters())
    report = slim_unet(unet, tiny_stats, config, progress=False)
    ranks = {n: e.rank for n, e in report.plan.modules.items()}
    assert model.predict_speedup(ranks) >= 1.3
    assert report.plan.info["latency_budget"]["predicted_speedup"] == pytest.approx(model.predict_speedup(ranks))
    info = report.plan.info["latency_budget"]
    floor = {s.name: min(s.width, 8) for s in module_sites(unet)}
    assert info["predicted_ceiling"] == pytest.approx(model.predict_speedup(floor))
    saved = model.dense_ms - model.predict_ms(ranks)
    assert info["share_of_savable_time"] == pytest.approx(saved / (model.dense_ms - model.predict_ms(floor)))
    assert 0 < info["share_of_savable_time"] < 1
    assert report.plan.info["family"] == "sd"  # what an export of the slim folder alone takes the call from
    assert before - sum(p.numel() for p in unet.parameters()) == report.plan.params_removed > 0
    assert isinstance(RankPlan.from_json(report.plan.to_json()), RankPlan)
    unreachable = SlimConfig(speedup=50.0, latency_table=str(path))
    with pytest.raises(SlimDiffError, match="out of reach"):
        check_budget(build_builtin_unet(), unreachable)  # before calibration
    with pytest.raises(SlimDiffError, match="out of reach"):
        slim_unet(build_builtin_unet(), tiny_stats, unreachable, progress=False)


def test_latency_budget_configuration_errors(tmp_path):
    from slimdiff.slim import SlimConfig

    with pytest.raises(SlimDiffError, match="both"):
        SlimConfig(speedup=1.2)
    with pytest.raises(SlimDiffError, match="exceed 1"):
        SlimConfig(speedup=0.9, latency_table="t.json")


def build_builtin_unet():
    from slimdiff.models import build_builtin

    return build_builtin("builtin:tiny").unet


@pytest.mark.parametrize("model", ["builtin:tiny-flux", "builtin:tiny-sd3"])
def test_dit_tables_time_every_sublayer_as_the_denoiser_calls_it(model, monkeypatch):
    """A DiT's table: joint attentions (SD3, FLUX's double-stream blocks) called with both token streams and FLUX's
    rotary table, attentions with normalised q·k over their v widths, FLUX's single-stream sub-layers with their
    share of the proj_out they have in common; the family's text length. Timing is replaced by a count of the timed
    calls (one per sub-layer call, one per shared column block), so the structure is checked, not the clock."""
    from slimdiff.bench import latency_table
    from slimdiff.families import family_for
    from slimdiff.models import build_builtin

    calls = []

    def counted(fn, device, warmup, iters):
        fn()  # the module must run on the recorded arguments
        calls.append(fn)
        return 1.0

    monkeypatch.setattr(latency_table, "_time_module", counted)
    pipe = build_builtin(model)
    family = family_for(pipe)
    denoiser = family.denoiser(pipe)
    table = latency_table.measure_latency_table(denoiser, LATENT, 2, max_points=2, warmup=1, iters=1)
    assert table["text_len"] == family.text_tokens
    model_ = LatencyModel(table, denoiser)  # every site has an entry
    assert model_.predict_ms({}) == pytest.approx(table["dense_unet_ms"])
    with pytest.raises(SlimDiffError, match=f"measured on a sd model's call, not a {family.name} model's"):
        LatencyModel({**table, "family": "sd"}, denoiser)  # one line, not a failing meta-device forward
    sites = module_sites(denoiser)
    with_qk = {s.sublayer_path for s in sites if s.kind == QK}
    assert {s.sublayer_path for s in sites if s.kind == VO} - with_qk == (
        {s.sublayer_path for s in sites if s.kind == VO} if model == "builtin:tiny-flux" else set())
    if model == "builtin:tiny-flux":  # the shared proj_out's column blocks follow the sites' ranks
        with torch.device("meta"):
            meta = family.build(denoiser.config)
        dim = denoiser.config["num_attention_heads"] * denoiser.config["attention_head_dim"]
        for kind in (FFN, VO):
            site = next(s for s in sites if s.block.startswith("single_transformer_blocks") and s.kind == kind)
            per_rank = site.heads if kind == VO else 1
            shared = [latency_table._resized_module(meta, site, {kind: r}, "cpu", torch.float32)[1]
                      for r in (site.width, site.width // 2)]
            assert shared == [[(per_rank * site.width, dim)], [(per_rank * (site.width // 2), dim)]], kind
    for group in table["groups"]:
        (curve,) = group["curves"].values()
        shares = 2 if model == "builtin:tiny-flux" and "single_transformer_blocks" in group["sites"][0] else 1
        values = [v for row in curve["ms"] for v in (row if isinstance(row, list) else [row])]
        assert values == [float(shares)] * len(values), group["key"]



@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-flux"])
def test_time_breakdown_splits_the_dense_call_and_gives_the_ceiling(model):
    from slimdiff.models import build_builtin

    pipe = build_builtin(model)
    unet = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    table = _table(unet, lambda g: 1e-3 * g.tokens, lambda g: 2e-3 * g.tokens, other_ms=10.0)
    rows = time_breakdown(table)
    *groups, rest = rows
    assert rest["kind"] == "rest" and rest["dense_ms"] == pytest.approx(10.0)
    assert sum(r["dense_ms"] for r in rows) == pytest.approx(table["dense_unet_ms"])
    assert sum(r["dense_share"] for r in rows) == pytest.approx(1.0)
    assert {g["kind"] for g in groups} >= {"ffn"}
    assert sum(g["sublayers"] for g in groups) == len({s.sublayer_path for s in module_sites(unet)})
    # every sub-layer at its group's smallest measured rank: the latency model's own prediction
    smallest = {}
    for s in module_sites(unet):
        curve = next(g["curves"] for g in table["groups"] if s.sublayer_path in g["sites"])
        smallest[s.name] = next(iter(curve.values()))["ranks"][0]
    floor_ms = sum(r["smallest_ms"] for r in rows)
    assert floor_ms == pytest.approx(LatencyModel(table, unet).predict_ms(smallest))
    assert all(g["smallest_ms"] < g["dense_ms"] for g in groups)


def test_bench_latency_table_says_where_the_time_goes(tmp_path, capsys, monkeypatch):
    """``slimdiff bench --latency-table`` prints each kind's share of the dense call and the ceiling of any rank
    plan: a user sees before slimming whether their model and GPU leave room for the speed-up they want."""
    from slimdiff.bench import latency_table
    from slimdiff.cli import main

    def fake_time(fn, device, warmup, iters):  # no timing: a sub-layer "costs" the parameters it ran with
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: seen.append(sum(p.numel() for p in m.parameters(recurse=False))))
        try:
            fn()
        finally:
            handle.remove()
        return 1e-4 * sum(seen)

    monkeypatch.setattr(latency_table, "_time_module", fake_time)
    monkeypatch.setattr(latency_table, "_dense_unet_ms", lambda *a, **k: 1000.0)
    out = tmp_path / "table.json"
    assert main(["bench", "--model", "builtin:tiny", "--latency-table", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    rows = time_breakdown(load_table(out))
    rest = rows[-1]["dense_ms"]
    ceiling = 1000.0 / sum(r["smallest_ms"] for r in rows)
    assert f"outside the slimmable sub-layers {100 * rest / 1000:.0f} %" in printed
    assert f"no rank plan is predicted faster than {ceiling:.2f}×" in printed
    assert "ffn " in printed and "(→ " in printed


def test_bench_latency_table_flags_sublayers_that_outlast_the_call(tmp_path, capsys, monkeypatch):
    """Sub-layers timed alone that add up to more than the whole call (a busy machine) are called noisy, not
    printed as a negative share."""
    from slimdiff.bench import latency_table
    from slimdiff.cli import main

    monkeypatch.setattr(latency_table, "_time_module", lambda fn, device, warmup, iters: 5.0)
    monkeypatch.setattr(latency_table, "_dense_unet_ms", lambda *a, **k: 10.0)
    assert main(["bench", "--model", "builtin:tiny", "--latency-table", str(tmp_path / "t.json"),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "the timings are noisy" in printed and "where the time goes" not in printed


def test_committed_sdxl_table_prices_sdxl_base_at_1024():
    """The H200 table committed for SDXL users (`slimdiff slim --speedup ... --latency-table` on SDXL-base at 1024²,
    batch 2, fp16) still fits SDXL-base's sites as this version reads them, and gives the ceiling the README
    states."""
    from pathlib import Path

    from slimdiff.bench.memory import unet_config
    from slimdiff.families import family_named

    table = load_table(Path(__file__).parents[1] / "bench/results/2026-12-04-h200/latency_table.json")
    family = family_named("sdxl")
    with torch.device("meta"):
        unet = family.build(unet_config("builtin:sdxl-shape"))
    model = LatencyModel(table, unet, (128, 128))
    floor = {s.name: min(s.width, 8) for s in module_sites(unet)}
    assert model.predict_speedup(floor) == pytest.approx(1.586, abs=5e-4)
    rows = time_breakdown(table)
    assert rows[-1]["dense_share"] == pytest.approx(0.406, abs=5e-4)


def test_slim_with_a_latency_budget_says_how_deep_the_plan_goes(tmp_path, capsys):
    """`slimdiff slim --speedup` prints the predicted speed-up against the table's ceiling, and a note when the
    plan takes nearly all the time rank plans can save (every module near its floor: quality to be checked)."""
    from slimdiff.cli import main
    from slimdiff.models import build_builtin

    unet = build_builtin("builtin:tiny").unet
    table = _table(unet, lambda g: 1e-3 * g.tokens, lambda g: 4e-3 * g.tokens)
    path = save_table(table, tmp_path / "table.json")
    model = LatencyModel(table, unet)
    floor_ms = model.predict_ms({s.name: min(s.width, 8) for s in module_sites(unet)})
    stats = tmp_path / "stats"
    assert main(["calibrate", "--model", "builtin:tiny", "--num-prompts", "4", "--steps", "3", "--pass1-prompts",
                 "2", "--out", str(stats)]) == 0
    depth = {}
    for name, share in (("shallow", 0.3), ("deep", 0.97)):
        target = model.dense_ms / (model.dense_ms - share * (model.dense_ms - floor_ms))
        capsys.readouterr()
        assert main(["slim", "--model", "builtin:tiny", "--stats", str(stats), "--speedup", f"{target:.4f}",
                     "--latency-table", str(path), "--out", str(tmp_path / name)]) == 0
        depth[name] = capsys.readouterr().out
    for printed in depth.values():
        assert f"of at most {model.dense_ms / floor_ms:.3f}× on this table (every module at rank 8)" in printed
    assert "note: a plan this close to the ceiling" not in depth["shallow"]
    assert "note: a plan this close to the ceiling" in depth["deep"]
