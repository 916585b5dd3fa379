"""``slimdiff-export`` end to end (in-process ``main``), and its answers to bad input: one error line, a
non-zero exit, nothing half-written."""

import json
import multiprocessing

import pytest
import torch
from export_support import FAST_CALIBRATION, TWO_LEVEL_UNET, cached_cli_export, slim_tiny_unet

from slimdiff.errors import SlimDiffError
from slimdiff.cli import export as cli
from slimdiff.engines.trt import tensorrt_available
from slimdiff.runtime import EngineUNet
from slimdiff.serialization import load_plan, load_slim, save_slim, verify_slim_folder


def _nothing_written(out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("slimdiff-export: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    return errors[0]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """``slimdiff-export`` of builtin:tiny to ORT (dense and slim engines, the slim UNet folder) and its stdout;
    the same run also writes the Triton repository test_triton.py serves."""
    root, printed = cached_cli_export(tmp_path_factory)
    return root / "engines", printed


@pytest.mark.slow
def test_dense_model_gives_dense_and_slim_engines_verified(tiny_export):
    out, printed = tiny_export
    table = printed.splitlines()
    assert table[0].split()[:3] == ["engine", "variant", "file"]
    assert [line.split()[:3] for line in table[2:4]] == [["ort", "dense", "dense/unet.ort.onnx"],
                                                       ["ort", "slim", "slim/unet.ort.onnx"]]
    assert "fewer)" in table[4]
    summary = json.loads((out / "export.json").read_text())
    dense, slim = summary["rows"]
    assert slim["parameters"] < dense["parameters"]
    assert dense["max_rel_error"] <= 1e-4 and slim["max_rel_error"] <= 1e-4
    assert slim["fused_ops"]["Attention"] == 14 and summary["opset"] == 23
    engine = EngineUNet.from_folder(out / "slim")
    assert engine.rank_plan is not None and engine.rank_plan.params_removed > 0
    assert not list(out.parent.glob(".*partial*"))  # the temporary folder was renamed, not left
    # the slim UNet the engine was built from, loadable by diffusers' conventions and equal to the engine
    assert summary["dense_model"] == "builtin:tiny" and summary["slim_model"] == "slim-unet"
    verify_slim_folder(out / "slim-unet")
    slim_unet = load_slim(out / "slim-unet")
    assert load_plan(out / "slim-unet").info["source_model"] == "builtin:tiny"
    assert sum(p.numel() for p in slim_unet.parameters()) == slim["parameters"]
    sample, t, context = torch.randn(1, 4, 16, 16), torch.full((1,), 500.0), torch.randn(1, 77, 64)
    with torch.no_grad():
        ours = slim_unet(sample, t, encoder_hidden_states=context).sample
        theirs = engine(sample, t, encoder_hidden_states=context).sample
    assert (ours - theirs).norm() / ours.norm() < 1e-4


def test_bench_times_the_exported_models_and_engines_without_rebuilding(tiny_export, monkeypatch):
    import slimdiff.engines.build as build

    from slimdiff.bench.harness import BenchConfig, run_bench

    out, _ = tiny_export

    def no_builds(*args, **kwargs):
        raise AssertionError("an engine was built again")

    monkeypatch.setattr(build, "build_denoiser_engine", no_builds)
    report = run_bench(BenchConfig(model=str(out), engines=["eager", "ort"], budgets=[0.0], batches=[1],
                                   device="cpu", warmup=0, iters=2, e2e=False), log=lambda msg: None)
    rows = json.loads((out / "export.json").read_text())["rows"]
    dense, slim = report["models"]
    assert dense["params"] == rows[0]["parameters"] and slim["params"] == rows[1]["parameters"]
    assert report["model"]["plan_source"] == "calibrated" and report["model"]["weights"] == "seeded-random"
    cells = {(r["engine"], r["budget"]): r for r in report["results"]}
    assert all(r["status"] == "ok" for r in cells.values()), cells
    assert cells[("ort", 0.0)]["engine_info"]["prebuilt"] == str(out / "dense")
    assert cells[("ort", slim["budget"])]["engine_info"]["prebuilt"] == str(out / "slim")
    assert cells[("ort", slim["budget"])]["error_vs_eager"] < 1e-4  # the engine runs the slim folder's model
    assert cells[("ort", slim["budget"])]["interleaved"] is not None
    with pytest.raises(SlimDiffError, match="leave out budgets"):
        run_bench(BenchConfig(model=str(out), budgets=[0.0, 0.4], device="cpu"), log=lambda msg: None)


@pytest.mark.slow
def test_slim_folder_gives_slim_engine_and_force_replaces_output(tmp_path, capsys):
    unet, plan = slim_tiny_unet(seed=6, config=TWO_LEVEL_UNET)  # two levels: the export's time follows the graph
    save_slim(unet, plan, tmp_path / "slim-unet")
    out = tmp_path / "engines"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    rc = cli.main(["--model", str(tmp_path / "slim-unet"), "--engine", "ort", "--out", str(out), "--force",
                   "--batch", "1:2:2", "--height", "64", "--width", "64", "--text-len", "77"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert not (out / "stale.txt").exists() and not (out / "dense").exists()
    rows = json.loads((out / "export.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["slim"]
    meta = json.loads((out / "slim" / "unet.engine.json").read_text())
    assert meta["rank_plan"]["modules"] == json.loads(plan.to_json())["modules"]
    assert meta["axes"]["batch"] == {"min": 1, "opt": 2, "max": 2, "multiple": 1}
    assert meta["axes"]["text_len"] == {"min": 77, "opt": 77, "max": 77, "multiple": 1}


def test_existing_output_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = cli.main(["--model", "builtin:tiny", "--engine", "ort", "--out", str(out)])
    assert rc == 2
    assert "already exists (use --force" in _one_error_line(capsys.readouterr().err)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_trt_without_tensorrt_is_one_line_naming_the_alternatives(tmp_path, capsys):
    out = tmp_path / "engines"
    rc = cli.main(["--model", "builtin:tiny", "--engine", "trt", "--out", str(out)])
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert rc == 2 and err.strip() == line  # nothing else was started
    assert "TensorRT is not installed" in line and "--engine ort" in line and "--engine aoti" in line
    assert _nothing_written(out)


def test_model_that_is_neither_dense_nor_slim(tmp_path, capsys):
    junk = tmp_path / "some-folder"
    junk.mkdir()
    (junk / "weights.bin").write_bytes(b"\x00" * 64)
    out = tmp_path / "engines"
    rc = cli.main(["--model", str(junk), "--engine", "ort", "--out", str(out)])
    assert rc == 2
    assert "is neither a dense model" in _one_error_line(capsys.readouterr().err)
    assert _nothing_written(out)


@pytest.mark.parametrize("flags, message", [
    (["--height", "40"], "multiples of 16 pixels"),  # builtin:tiny: VAE scale 2 x latent multiple 8
    (["--batch", "1:2:4,1:1:1", "--height", "16,32,48"], "different numbers of ranges"),
    (["--batch", "4:2:1"], "min <= opt <= max"),
    (["--opset", "17"], "--opset 17 is not supported"),
])
def test_bad_shape_and_opset_flags(tmp_path, capsys, flags, message):
    out = tmp_path / "engines"
    rc = cli.main(["--model", "builtin:tiny", "--engine", "ort", "--out", str(out), "--slim-only", *flags])
    assert rc == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert _nothing_written(out)


def test_failure_midway_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    def fail_after_writing(args, variant, unet, plan, folder, **kwargs):
        folder.mkdir()
        (folder / "unet.onnx").write_bytes(b"half an export")
        raise SlimDiffError("simulated failure while building the engine")

    monkeypatch.setattr(cli, "_build_variant", fail_after_writing)
    out = tmp_path / "engines"
    rc = cli.main(["--model", "builtin:tiny", "--engine", "ort", "--out", str(out)])
    assert rc == 2
    assert "simulated failure" in _one_error_line(capsys.readouterr().err)
    assert _nothing_written(out)


def test_a_second_process_reports_its_error_and_ends_with_the_command(tmp_path, capsys, monkeypatch):
    """``--jobs 2``: the dense engine's process hands its error back as the command's, and when the command fails
    first (here the slim engine's build) it ends that process and leaves nothing behind."""
    with pytest.raises(SlimDiffError, match="no-such-model"):
        cli._SecondProcess(cli._load_model, "builtin:no-such-model").result()

    def fail_after_writing(args, variant, unet, plan, folder, **kwargs):
        folder.mkdir()
        (folder / "unet.onnx").write_bytes(b"half an export")
        raise SlimDiffError(f"simulated failure while building the {variant} engine")

    monkeypatch.setattr(cli, "_build_variant", fail_after_writing)  # in this process only: the slim variant's
    out = tmp_path / "engines"
    rc = cli.main(["--model", "builtin:tiny", "--engine", "ort", "--out", str(out), "--jobs", "2",
                   *FAST_CALIBRATION])
    assert rc == 2
    assert "simulated failure while building the slim engine" in _one_error_line(capsys.readouterr().err)
    assert _nothing_written(out)
    assert not multiprocessing.active_children()


def test_table_formatting():
    rows = [{"engine": "ort", "variant": "dense", "file": "dense/unet.ort.onnx", "size_bytes": 3 * 2**20,
             "parameters": 1234567, "max_abs_error": 1.5e-6, "load_seconds": 0.123}]
    lines = cli.format_table(rows).splitlines()
    assert lines[0].split() == ["engine", "variant", "file", "size", "parameters", "max", "abs", "error", "load",
                                "time"]
    assert lines[2].split() == ["ort", "dense", "dense/unet.ort.onnx", "3.0", "MiB", "1,234,567", "1.50e-06",
                                "0.12", "s"]


def test_export_that_cannot_fit_is_refused_before_calibration(tmp_path, capsys, monkeypatch):
    import collections

    from slimdiff import api

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 10**4, 10**4))
    monkeypatch.setattr(api, "collect_statistics", lambda *a, **k: pytest.fail("calibration started"))
    out = tmp_path / "engines"
    rc = cli.main(["--model", "builtin:tiny", "--engine", "ort", "--out", str(out), *FAST_CALIBRATION])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "the engines need at least" in line and "has 0.0 GB free" in line, line
    assert _nothing_written(out)


@pytest.mark.slow
def test_export_room_estimate_is_a_lower_bound_of_what_is_written(tiny_export):
    """The estimate the refusal above compares with the free space: never more than the export of builtin:tiny
    wrote (a refusal must not stop an export that fits), and most of it (the rest: the text encoder's and the VAE's
    engines a Triton repository brings, graph structure, the engines' JSON records)."""
    from slimdiff import engines
    import argparse

    from slimdiff.models import build_builtin
    from slimdiff.slim import SlimConfig

    out, _ = tiny_export
    args = argparse.Namespace(model="builtin:tiny", variant=None, slim_only=False, out=str(out))
    dense = build_builtin("builtin:tiny").unet
    need = cli.export_bytes_needed(args, engines.get("ort"), dense, None, (SlimConfig(budget=0.4),), torch.float32,
                                   [])
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "repo" not in f.parts)
    assert 0.8 * written < need <= written, (need, written)
