"""Benchmark harness and report: schema, skipped and failed engines are reported with reasons, files written."""

import copy
import json

import pytest

from slimdiff.bench import engines
from slimdiff.bench.harness import BenchConfig, run_bench
from slimdiff.bench.report import console_table, validate_report, write_report
from slimdiff.errors import SlimDiffError


class _BrokenEngine(engines.Engine):
    name = "broken-test"
    description = "an engine whose build always fails (test only)"

    def build(self, unet, batches, latent, text_len, workdir):
        raise RuntimeError("no kernel for this shape")


@pytest.fixture(scope="module")
def report():
    engines.register(_BrokenEngine)
    config = BenchConfig(model="builtin:tiny", engines=["eager", "trt", "broken-test"], budgets=[0.0, 0.4],
                         batches=[2], device="cpu", warmup=1, iters=2, e2e_steps=2, e2e_runs=1)
    return run_bench(config, log=lambda msg: None)


def test_report_follows_the_schema_and_round_trips(report, tmp_path):
    validate_report(report)
    out = write_report(report, tmp_path / "rep")
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "latency_vs_removed.png", "speedup.png"}
    validate_report(json.loads((out / "report.json").read_text()))
    assert "| eager | 0.4 | 2 |" in (out / "report.md").read_text()
    assert not list(tmp_path.glob(".rep.partial-*"))  # written to a temporary folder, then renamed


def test_engine_that_cannot_run_is_listed_as_skipped_with_its_reason(report):
    trt = report["engines"]["trt"]
    assert trt["status"] == "skipped" and "CUDA" in trt["reason"]
    assert not [r for r in report["results"] if r["engine"] == "trt"]
    assert "trt      skipped:" in console_table(report)


def test_engine_that_fails_is_reported_per_cell_and_others_still_run(report):
    broken = [r for r in report["results"] if r["engine"] == "broken-test"]
    assert {r["budget"] for r in broken} == {0.0, 0.4}
    assert all(r["status"] == "failed" and "no kernel for this shape" in r["reason"] for r in broken)
    eager = [r for r in report["results"] if r["engine"] == "eager"]
    assert [r["status"] for r in eager] == ["ok", "ok"]


def test_report_labels_seeded_weights_and_synthetic_plans(report):
    assert report["model"]["weights"] == "seeded-random"
    assert report["model"]["plan_source"] == "synthetic"
    slim = next(r for r in report["results"] if r["engine"] == "eager" and r["budget"] == 0.4)
    dense = next(r for r in report["results"] if r["engine"] == "eager" and r["budget"] == 0.0)
    # A seeded re-initialisation says nothing about quality: no error is reported for it.
    assert slim["error_vs_dense"] is None and slim["e2e"]["image_error_vs_dense"] is None
    assert dense["error_vs_dense"] == 0.0
    assert slim["ideal_speedup"] > 1.0  # the slim model does fewer MACs
    assert slim["e2e"]["unet_calls"] >= 2 and slim["e2e"]["outside_unet_ms"] >= 0


def test_environment_names_versions_and_commit(report):
    env = report["environment"]
    assert env["libraries"]["torch"] and env["libraries"]["diffusers"]
    assert "commit" in env["git"] and env["device"]["type"] == "cpu"


@pytest.mark.parametrize("breakage", ["missing-key", "skipped-without-reason", "unlisted-engine", "bad-weights"])
def test_schema_violations_are_rejected(report, breakage):
    bad = copy.deepcopy(report)
    if breakage == "missing-key":
        del bad["results"][0]["unet"]
    elif breakage == "skipped-without-reason":
        bad["engines"]["trt"]["reason"] = None
    elif breakage == "unlisted-engine":
        del bad["engines"]["trt"]
    else:
        bad["model"]["weights"] = "unknown"
    with pytest.raises(SlimDiffError):
        validate_report(bad)


def test_existing_output_is_not_overwritten_without_force(report, tmp_path):
    write_report(report, tmp_path / "rep")
    with pytest.raises(SlimDiffError, match="already exists"):
        write_report(report, tmp_path / "rep")
    write_report(report, tmp_path / "rep", overwrite=True)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from slimdiff.bench.cli import main

    out = tmp_path / "rep"
    for argv in (["--engines", "nope"], ["--budgets", "0,abc"], ["--batch", "1.5"]):
        assert main(["--model", "builtin:tiny", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("slimdiff bench: error:")
    assert not out.exists()


def test_macs_only_reports_ideal_speedups_without_running_a_model(tmp_path, capsys):
    from slimdiff.bench.cli import main

    assert main(["--model", "builtin:tiny", "--budgets", "0,0.4", "--batch", "1", "--macs-only",
                 "--out", str(tmp_path / "m")]) == 0
    body = json.loads((tmp_path / "m" / "macs.json").read_text())
    dense, slim = body["rows"]
    assert dense["ideal_speedup"] == 1.0 and slim["ideal_speedup"] > 1.0
    assert slim["params_removed"] > 0 and slim["macs"]["total"] < dense["macs"]["total"]


def test_slim_cells_are_timed_interleaved_with_the_dense_model(report):
    slim = next(r for r in report["results"] if r["engine"] == "eager" and r["budget"] == 0.4)
    paired = slim["interleaved"]
    assert len(paired["dense_ms"]) == len(paired["slim_ms"]) == report["config"]["iters"]
    assert slim["speedup"] == paired["interval"]["speedup"]
    assert paired["interval"]["low"] <= slim["speedup"] <= paired["interval"]["high"]
    assert slim["speedup_status"] in ("measured", "noisy")
    assert (slim["speedup_status"] == "noisy") == bool(slim["noisy_reasons"])
    dense = next(r for r in report["results"] if r["engine"] == "eager" and r["budget"] == 0.0)
    assert dense["speedup_status"] == "reference" and dense["interleaved"] is None
    table = console_table(report)
    assert "[95% CI]" in table and "How to read this" in table


def test_a_slim_speedup_is_never_printed_without_its_interval_or_verdict(report):
    bad = copy.deepcopy(report)
    slim = next(r for r in bad["results"] if r["engine"] == "eager" and r["budget"] == 0.4)
    slim["interleaved"] = None
    with pytest.raises(SlimDiffError, match="interleaved"):
        validate_report(bad)
    original = next(r for r in report["results"] if r["engine"] == "eager" and r["budget"] == 0.4)
    slim["interleaved"], slim["speedup_status"], slim["noisy_reasons"] = original["interleaved"], "noisy", []
    with pytest.raises(SlimDiffError, match="noisy without a reason"):
        validate_report(bad)


def test_the_dense_model_is_measured_first_when_the_order_puts_a_slim_model_first():
    from slimdiff.bench.harness import Bench

    bench = Bench(BenchConfig(model="builtin:tiny", engines=["eager"], budgets=[0.0, 0.4], batches=[1],
                              device="cpu", warmup=0, iters=2, e2e=False), log=lambda msg: None)
    bench.prepare()
    bench.run_engines(["eager"], order=[("eager", 0.4)])
    assert [r["budget"] for r in bench.results] == [0.0, 0.4]
    assert bench.results[1]["interleaved"] is not None
    assert not bench.dense_runs  # released after the engine's last job


def test_timed_budgets_in_transformer_macs_use_the_plans_the_mac_table_prices(monkeypatch):
    import slimdiff.bench.harness as harness
    from slimdiff.bench.macs import ideal_table

    cpus = harness.machine_info()["cpu_count"]
    monkeypatch.setattr(harness, "load_average", lambda: cpus + 1.5)  # and the machine was busy meanwhile
    config = BenchConfig(model="builtin:tiny", engines=["eager"], budgets=[0.0, 0.5], budget_unit="macs",
                         batches=[1], device="cpu", warmup=0, iters=2, e2e=False)
    timed = run_bench(config, log=lambda msg: None)
    validate_report(timed)
    slim_cell = next(r for r in timed["results"] if r["budget"] > 0)
    assert slim_cell["load_average"] == [cpus + 1.5, cpus + 1.5]
    assert slim_cell["speedup_status"] == "noisy" and any("busy" in r for r in slim_cell["noisy_reasons"])
    assert "transformer-block MACs" in timed["model"]["budget_unit"]
    dense, slim = (m["macs"]["1"] for m in timed["models"])
    removed = 1 - slim["transformer"] / dense["transformer"]
    assert abs(removed - 0.5) < 0.1 and slim["other"] == dense["other"]
    from slimdiff.models import BUILTIN_DENOISER_CONFIGS

    table = ideal_table(dict(BUILTIN_DENOISER_CONFIGS["builtin:tiny"]), [0.0, 0.5], [1], tuple(timed["model"]["latent"]),
                        unit="macs")
    assert [r["macs"]["total"] for r in table] == [dense["total"], slim["total"]]


def test_export_folders_the_bench_cannot_time_are_refused_in_one_line(tmp_path, capsys):
    from slimdiff.bench.cli import main

    old = tmp_path / "old-export"
    old.mkdir()
    (old / "export.json").write_text(json.dumps({"format": "slimdiff-export/1", "model": "builtin:tiny",
                                                 "engine": "ort"}))
    assert main(["--model", str(old), "--device", "cpu"]) == 2
    assert "holds no dense source or no slim UNet folder" in capsys.readouterr().err
    (old / "export.json").write_text(json.dumps({"format": "slimdiff-export/1", "dense_model": "builtin:tiny",
                                                 "slim_model": "slim-unet", "engine": "ort"}))
    assert main(["--model", str(old), "--device", "cpu", "--budgets", "0,0.4"]) == 2
    assert "leave out budgets, statistics" in capsys.readouterr().err
    (old / "export.json").write_text("{")
    assert main(["--model", str(old), "--device", "cpu"]) == 2
    assert "is corrupt" in capsys.readouterr().err


def test_a_slim_folder_is_timed_against_the_model_it_was_slimmed_from(tiny_stats, tmp_path, capsys):
    """`slimdiff bench --model SLIM` (a `slimdiff slim` folder, or a `--save-pipeline` folder): the dense row is the
    model the plan records it was slimmed from — it was the slim model itself, labelled dense — and the slim row is
    the folder's denoiser, timed interleaved against it; nothing is slimmed again."""
    from slimdiff.bench.cli import main
    from slimdiff.bench.harness import given_models
    from slimdiff.models import build_builtin
    from slimdiff.serialization import save_slim, save_slim_pipeline
    from slimdiff.slim import SlimConfig, slim_unet

    pipe = build_builtin("builtin:tiny")
    dense_params = sum(p.numel() for p in pipe.unet.parameters())
    plan = slim_unet(pipe.unet, tiny_stats, SlimConfig(budget=0.3), progress=False).plan
    plan.info["source_model"] = "builtin:tiny"
    save_slim(pipe.unet, plan, tmp_path / "slim")
    save_slim_pipeline(pipe, plan, tmp_path / "pipe")
    slim_params = sum(p.numel() for p in pipe.unet.parameters())
    report = run_bench(BenchConfig(model=str(tmp_path / "slim"), engines=["eager"], budgets=[0.0], batches=[1],
                                   device="cpu", warmup=0, iters=2, e2e=False), log=lambda msg: None)
    dense, slim = report["models"]
    assert (dense["params"], slim["params"]) == (dense_params, slim_params) and dense_params > slim_params
    assert slim["budget"] == round(plan.params_removed / plan.compressible_params, 4)
    assert slim["label"] == f"slim ({tmp_path / 'slim'})"
    assert report["model"]["plan_source"] == "calibrated" and "against builtin:tiny" in report["model"]["plan_note"]
    cells = {r["budget"]: r for r in report["results"]}
    assert cells[slim["budget"]]["status"] == "ok" and cells[slim["budget"]]["interleaved"] is not None
    assert cells[slim["budget"]]["error_vs_dense"] > 0  # the slim model against another, dense one
    # a pipeline folder brings the same two models: its slim UNet, and the model its plan records
    given = given_models(str(tmp_path / "pipe"))
    assert given.slim_folder == tmp_path / "pipe" / "unet" and given.dense["source"] == "builtin:tiny"
    assert main(["--model", str(tmp_path / "pipe"), "--device", "cpu", "--budgets", "0,0.4"]) == 2
    assert "brings its dense and slim models" in capsys.readouterr().err
    # --macs-only counts the folder's own plan against the dense shapes (it counted synthetic plans of the folder)
    assert main(["--model", str(tmp_path / "slim"), "--macs-only", "--batch", "1", "--json"]) == 0
    dense_row, folder_row = json.loads(capsys.readouterr().out)["rows"]
    assert (dense_row["plan"], dense_row["params"]) == (None, dense_params)
    assert (folder_row["plan"], folder_row["params"]) == ("given", slim_params) and folder_row["ideal_speedup"] > 1
