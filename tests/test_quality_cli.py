"""``slimdiff eval`` on builtin:tiny: files written, refusals, optional metrics reported as skipped."""

import argparse
import json
import sys
import types

import numpy as np
import pytest
import torch

from slimdiff.errors import SlimDiffError
from slimdiff.quality import optional
from slimdiff.quality.cli import add_parser

PROMPTS = "a red bus\ntwo dogs on a beach\na bowl of fruit\n"


def _eval(*argv):
    parser = argparse.ArgumentParser(prog="slimdiff")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    args.func(args)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture
def slim_folder(tmp_path, tiny_pipe, tiny_stats):
    from slimdiff.serialization import save_slim
    from slimdiff.slim import SlimConfig, slim_unet

    report = slim_unet(tiny_pipe.unet, tiny_stats, SlimConfig(budget=0.4), progress=False)
    report.plan.info["source_model"] = "builtin:tiny"
    return save_slim(tiny_pipe.unet, report.plan, tmp_path / "slim")


def test_eval_writes_report_and_refuses_an_existing_folder(tmp_path, prompt_file, slim_folder, capsys):
    out = tmp_path / "report"
    common = ["--model", "builtin:tiny", "--slim", str(slim_folder), "--prompts", str(prompt_file), "--num", "2",
              "--steps", "2", "--out", str(out)]
    _eval(*common, "--save-images")
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "report.json", "report.md"]
    assert len(list((out / "images" / "slim").glob("*.png"))) == 2
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert report["label"].startswith("seeded random weights")
    assert report["slim"]["made_from"] == "builtin:tiny"
    assert report["slim"]["params"] < report["dense"]["params"] and report["slim"]["macs"] < report["dense"]["macs"]
    assert m["noise_prediction_error"]["mean"] > 0 and len(m["noise_prediction_error"]["per_step"]) == 3
    assert m["fidelity"]["ssim"]["n"] == 2 and m["fidelity"]["psnr_db"]["identical_pairs"] == 0
    for name in ("lpips", "clip_score", "fid", "adherence"):  # none available here: each says why
        assert m[name]["skipped"], name
    assert "skipped" in (out / "report.md").read_text()
    assert "clip_score: skipped" in capsys.readouterr().out

    (out / "marker").write_text("keep")
    with pytest.raises(SlimDiffError, match="already exists"):
        _eval(*common)
    assert (out / "marker").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # no half-written sibling left
    _eval(*common, "--force")
    assert not (out / "marker").exists() and (out / "report.json").exists()


def test_a_slim_pipeline_folder_is_compared_as_the_slim_model_it_holds(tmp_path, prompt_file, tiny_pipe, tiny_stats):
    """`--slim` a `slimdiff slim --save-pipeline` folder: its slim UNet is compared, and the report names the model
    it was slimmed from, as for a slim folder (it was taken for some other pipeline, its origin unrecorded)."""
    from slimdiff.serialization import save_slim_pipeline
    from slimdiff.slim import SlimConfig, slim_unet

    plan = slim_unet(tiny_pipe.unet, tiny_stats, SlimConfig(budget=0.4), progress=False).plan
    plan.info["source_model"] = "builtin:tiny"
    save_slim_pipeline(tiny_pipe, plan, tmp_path / "pipe")
    _eval("--model", "builtin:tiny", "--slim", str(tmp_path / "pipe"), "--prompts", str(prompt_file), "--num", "1",
          "--steps", "2", "--out", str(tmp_path / "report"))
    slim = json.loads((tmp_path / "report" / "report.json").read_text())["slim"]
    assert slim["made_from"] == "builtin:tiny" and slim["params"] == sum(p.numel() for p in tiny_pipe.unet.parameters())


def test_dense_model_against_itself(tmp_path, prompt_file):
    out = tmp_path / "self"
    _eval("--model", "builtin:tiny", "--slim", "builtin:tiny", "--prompts", str(prompt_file), "--num", "2",
          "--steps", "2", "--out", str(out))
    m = json.loads((out / "report.json").read_text())["metrics"]
    assert m["noise_prediction_error"]["mean"] == 0
    assert m["fidelity"]["psnr_db"]["identical_pairs"] == 2 and m["fidelity"]["ssim"]["mean"] == pytest.approx(1)


def test_without_prompts_a_model_is_evaluated_on_the_packaged_partiprompts(tmp_path):
    from slimdiff.prompts import evaluation_prompts

    _eval("--model", "builtin:tiny", "--slim", "builtin:tiny", "--num", "2", "--steps", "2", "--out",
          str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["prompts"] == evaluation_prompts(2) and report["settings"]["prompts"].startswith("PartiPrompts")


def test_user_errors(tmp_path):
    from diffusers import UNet2DConditionModel

    from slimdiff.configs import TINY_UNET
    from slimdiff.quality.cli import _load_slim

    other = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 32})
    with pytest.raises(SlimDiffError, match="not comparable"):
        _load_slim("builtin:tiny", other, torch.float32, "cpu")


def test_optional_metrics_say_why_they_are_missing(tmp_path, monkeypatch):
    images = {"dense": np.zeros((1, 16, 16, 3), np.float32)}
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import fails as when not installed
    assert "not importable" in optional.clip_score(images, ["x"], "ViT-L-14", str(tmp_path), "cpu")["skipped"]
    assert "--clip-weights" in optional.clip_score(images, ["x"], None, None)["skipped"]
    monkeypatch.setitem(sys.modules, "lpips", None)
    assert "not importable" in optional.lpips_distance(images["dense"], {"s": images["dense"]})["skipped"]
    assert "--fid-real" in optional.fid({}, None, None)["skipped"]
    monkeypatch.setitem(sys.modules, "cleanfid", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    reason = optional.fid({}, str(tmp_path), None)["skipped"]
    assert "clean-fid" in reason and "torch-fidelity" in reason
    with pytest.raises(SlimDiffError, match="does not exist"):
        optional.fid({}, str(tmp_path / "missing"), None)


def test_clip_score_wiring_with_a_stand_in_open_clip(tmp_path, monkeypatch):
    """open_clip cannot be installed here; a stand-in checks what reaches it and how the score is formed."""
    class Model:  # text → the unit "red" direction; image → its mean RGB
        def eval(self):
            return self

        def encode_text(self, tokens):
            return torch.tensor([[1.0, 0.0, 0.0]]).repeat(len(tokens), 1)

        def encode_image(self, x):
            return x.mean(dim=(2, 3))

    fake = types.SimpleNamespace(
        create_model_and_transforms=lambda name, pretrained, device: (
            Model(), None, lambda pil: torch.from_numpy(np.asarray(pil, np.float32).transpose(2, 0, 1) / 255)),
        get_tokenizer=lambda name: (lambda texts: torch.zeros(len(texts), 1)))
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"")
    red = np.zeros((2, 8, 8, 3), np.float32)
    red[..., 0] = 1
    gray = np.full((2, 8, 8, 3), 0.5, np.float32)
    out = optional.clip_score({"dense": red, "slim": gray}, ["a", "b"], "ViT-L-14", str(weights))
    assert out["backbone"] == "ViT-L-14"
    assert out["dense"] == pytest.approx(1.0) and out["slim"] == pytest.approx(1 / np.sqrt(3), rel=1e-6)
