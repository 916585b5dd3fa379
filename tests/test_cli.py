"""End-to-end CLI: the main job on builtin:tiny, and every bad input ending in one error line."""

import json

import pytest
import torch

from slimdiff.cli import main
from slimdiff.models import build_builtin

FAST = ["--num-prompts", "4", "--steps", "3", "--pass1-prompts", "2"]


def _fails(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("slimdiff: error:") and match in err[0], err


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "stats"
    assert main(["calibrate", "--model", "builtin:tiny", *FAST, "--out", str(out)]) == 0
    return out


def test_slim_inspect_and_budget(stats_dir, tmp_path, capsys):
    out = tmp_path / "slim"
    assert main(["slim", "--model", "builtin:tiny", "--stats", str(stats_dir), "--budget", "0.4",
                 "--out", str(out), "--save-pipeline", str(tmp_path / "pipe")]) == 0
    report = json.loads((out / "slim_report.json").read_text())
    plan = json.loads((out / "slimdiff_plan.json").read_text())
    compressible = sum(m["width"] * m["unit_params"] for m in plan["modules"].values())
    removed = report["params_removed"]
    step = max(8 * m["unit_params"] for m in plan["modules"].values())
    assert abs(removed - 0.4 * compressible) <= step
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff" in table and f"removed {removed:,}" in table
    # the pipeline folder's plan is its slim UNet's, the same table under a line naming the component
    assert main(["inspect", str(tmp_path / "pipe")]) == 0
    assert capsys.readouterr().out == f"slim unet of the pipeline folder {tmp_path / 'pipe'}\n{table}"


def test_bad_inputs(stats_dir, tmp_path, capsys):
    out = tmp_path / "never"
    slim = ["slim", "--stats", str(stats_dir), "--out", str(out)]
    _fails(capsys, [*slim, "--model", str(tmp_path / "missing"), "--budget", "0.4"], "does not exist")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    _fails(capsys, [*slim, "--model", str(tmp_path / "vae"), "--budget", "0.4"],
           "is one component of a pipeline (AutoencoderKL, config.json), not a pipeline")
    _fails(capsys, [*slim, "--model", "builtin:tiny", "--budget", "0"], "budget")
    _fails(capsys, [*slim, "--model", "builtin:tiny", "--budget", "-3"], "budget")
    _fails(capsys, [*slim, "--model", "builtin:tiny", "--budget", "100M"], "budget")
    _fails(capsys, [*slim, "--model", "builtin:tiny", "--budget", "lots"], "budget")
    _fails(capsys, [*slim, "--model", "builtin:tiny"], "either --budget")
    _fails(capsys, [*slim, "--model", "builtin:tiny", "--budget", "0.4", "--speedup", "1.2"], "either --budget")
    _fails(capsys, [*slim, "--model", "builtin:tiny", "--speedup", "1.2"], "needs --latency-table")
    _fails(capsys, [*slim, "--model", "builtin:tiny", "--speedup", "1.2", "--latency-table",
                    str(tmp_path / "none.json")], "cannot read latency table")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _fails(capsys, ["slim", "--model", "builtin:tiny", "--prompts", str(empty), "--budget", "0.4",
                    "--out", str(out)], "no prompts")
    _fails(capsys, ["calibrate", "--model", "builtin:tiny", "--prompts", str(empty), "--out", str(tmp_path / "s")],
           "no prompts")
    other = tmp_path / "other-tiny"
    pipe = build_builtin("builtin:tiny")
    with torch.no_grad():
        pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(1.5)
    pipe.save_pretrained(other)
    capsys.readouterr()
    _fails(capsys, [*slim, "--model", str(other), "--budget", "0.4"], "different model")
    _fails(capsys, ["inspect", str(tmp_path)], "not a slim model folder")
    assert not out.exists() and not (tmp_path / "s").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial outputs


def test_slim_writes_a_diffusers_pipeline_folder(stats_dir, tmp_path, capsys):
    out, pipe_dir = tmp_path / "slim", tmp_path / "pipe"
    pipe_dir.mkdir()
    argv = ["slim", "--model", "builtin:tiny", "--stats", str(stats_dir), "--budget", "0.3", "--out", str(out),
            "--save-pipeline", str(pipe_dir)]
    _fails(capsys, argv, "already exists")  # refused before any work
    assert not out.exists()
    assert main([*argv, "--force"]) == 0
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["unet"] == ["slimdiff.slim_models", "SlimUNet2DConditionModel"]
    config = json.loads((pipe_dir / "unet" / "config.json").read_text())
    assert config["rank_plan"] == json.loads((out / "slimdiff_plan.json").read_text())


@pytest.mark.parametrize("command", ["slimdiff", "slimdiff-export"])
def test_version_is_the_packages(command, capsys):
    """``--version`` prints the version pyproject.toml gives the package (the two must not drift apart)."""
    import re
    from pathlib import Path

    from slimdiff.cli import export

    # the [project] table's version line (tomllib would need Python 3.11; the project takes 3.10)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    with pytest.raises(SystemExit) as exit_:
        (main if command == "slimdiff" else export.main)(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"slimdiff {declared}"
