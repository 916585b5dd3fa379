"""The commands on SDXL: a StableDiffusionXLPipeline folder saved by diffusers and builtin:tiny-xl through
`slimdiff slim`, `inspect`, `eval`, `slimdiff-export --engine ort|aoti` and `use_engine` (tiny, few steps)."""

import json

import numpy as np
import pytest
import torch

from slimdiff.cli import main
from slimdiff.cli.export import main as export_main
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.runtime import use_engine

FAST = ["--num-prompts", "2", "--steps", "2", "--pass1-prompts", "1", "--budget", "0.4"]
# One static shape (batch 2 = one image with guidance, latent 16², 77 tokens): the cheapest engine to build. A slim
# folder alone does not say its VAE's scale, so pixel flags are read at SD's 8 (128 px = latent 16 = tiny-xl's 32 px).
SHAPES = ["--batch", "2", "--height", "128", "--width", "128", "--text-len", "77", "--device", "cpu", "--fp32"]


@pytest.fixture(scope="module")
def slim_xl(tmp_path_factory):
    """(saved SDXL pipeline folder, its slim UNet folder written by `slimdiff slim`)."""
    root = tmp_path_factory.mktemp("xl_cli")
    build_builtin("builtin:tiny-xl").save_pretrained(root / "pipe", safe_serialization=True)
    assert main(["slim", "--model", str(root / "pipe"), *FAST, "--out", str(root / "slim")]) == 0
    return root / "pipe", root / "slim"


def _image(pipe):
    return pipe("a red circle above a blue square", num_inference_steps=2, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(5), output_type="np").images[0]


def test_slim_inspect_and_eval_on_an_sdxl_folder(slim_xl, tmp_path, capsys):
    folder, slim = slim_xl
    plan = json.loads((slim / "slimdiff_plan.json").read_text())
    assert plan["info"]["source_model"] == str(folder.resolve())
    assert main(["inspect", str(slim)]) == 0
    assert "mid_block.attentions.0.transformer_blocks.1.ff" in capsys.readouterr().out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    assert main(["eval", "--model", str(folder), "--slim", str(slim), "--prompts", str(prompts), "--num", "2",
                 "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "eval")]) == 0
    assert any((tmp_path / "eval").iterdir())


def test_slim_on_builtin_tiny_xl(tmp_path):
    assert main(["slim", "--model", "builtin:tiny-xl", *FAST, "--out", str(tmp_path / "slim")]) == 0
    assert json.loads((tmp_path / "slim" / "slimdiff_plan.json").read_text())["info"]["source_model"] == \
        "builtin:tiny-xl"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ort"])  # an SDXL AOTInductor engine: tests/test_engines.py (one compile)
def test_export_and_use_engine_in_the_sdxl_pipeline(slim_xl, tmp_path, engine):
    folder, slim = slim_xl
    out = tmp_path / "engines"
    assert export_main(["--model", str(slim), "--engine", engine, "--out", str(out), *SHAPES]) == 0
    row = json.loads((out / "export.json").read_text())["rows"][0]
    assert row["variant"] == "slim" and row["max_rel_error"] <= 1e-4
    pipe = load_pipeline(str(slim))  # the SDXL pipeline the slim UNet came from, with the slim UNet in it
    reference = _image(pipe)
    use_engine(pipe, out / "slim")
    assert np.abs(_image(pipe) - reference).max() < 1e-3
