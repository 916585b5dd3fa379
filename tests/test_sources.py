"""Pipeline folders as hubs ship them: fp16 variant files only, safety checker and feature extractor folders."""

import json

import pytest
import torch

from slimdiff.cli import main
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.sources import choose_variant, source_unet_dtype, stored_dtype

FAST = ["--num-prompts", "2", "--steps", "2", "--pass1-prompts", "1", "--budget", "0.3"]


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    """builtin:tiny saved in fp16 as variant files only, with a safety checker and feature extractor listed."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-fp16"
    build_builtin("builtin:tiny").to(torch.float16).save_pretrained(folder, variant="fp16")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    for name in ("safety_checker", "feature_extractor"):  # unusable on purpose: loading them would fail
        (folder / name).mkdir()
        (folder / name / "config.json").write_text("{broken")
    assert not list(folder.rglob("diffusion_pytorch_model.safetensors"))
    return folder


def test_variant_is_found_and_extras_are_ignored(fp16_folder):
    assert choose_variant(fp16_folder, None) == "fp16"
    pipe = load_pipeline(str(fp16_folder))
    assert pipe.unet.dtype == torch.float32 and pipe.safety_checker is None and pipe.feature_extractor is None
    reference = build_builtin("builtin:tiny").unet.to(torch.float16).state_dict()
    assert all(torch.equal(v.half(), reference[k]) for k, v in pipe.unet.state_dict().items())


def test_slim_unet_keeps_the_source_dtype(fp16_folder, tmp_path, capsys):
    out = tmp_path / "slim"
    assert main(["slim", "--model", str(fp16_folder), "--variant", "fp16", *FAST, "--out", str(out)]) == 0
    assert stored_dtype(out / "diffusion_pytorch_model.safetensors") == torch.float16
    # The slim folder records how its source was opened, and reopens its pipeline the same way.
    assert json.loads((out / "slimdiff_plan.json").read_text())["info"]["source_variant"] == "fp16"
    assert load_pipeline(str(out), torch.float16).unet.slim_plan.params_removed > 0
    out32 = tmp_path / "slim32"
    assert main(["slim", "--model", str(fp16_folder), "--save-dtype", "float32", *FAST, "--out", str(out32)]) == 0
    assert stored_dtype(out32 / "diffusion_pytorch_model.safetensors") == torch.float32
    half, full = ((o / "diffusion_pytorch_model.safetensors").stat().st_size for o in (out, out32))
    assert half < 0.6 * full


def test_missing_or_ambiguous_variants_are_one_line(fp16_folder, tmp_path, capsys):
    assert main(["calibrate", "--model", str(fp16_folder), "--variant", "bf16", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--variant bf16" in err[0] and "variants present: fp16" in err[0]
    (fp16_folder / "unet" / "diffusion_pytorch_model.bf16.safetensors").write_bytes(b"")
    try:
        assert main(["calibrate", "--model", str(fp16_folder), "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "choose one with --variant" in err[0] and "bf16, fp16" in err[0]
    finally:
        (fp16_folder / "unet" / "diffusion_pytorch_model.bf16.safetensors").unlink()
    assert not (tmp_path / "s").exists()


def _sharded(folder, variant):
    """builtin:tiny in bf16 saved in shards behind an index, as save_pretrained writes weights above its shard size
    (FLUX.1-dev's transformer as published, an SDXL UNet saved in float32)."""
    build_builtin("builtin:tiny").to(torch.bfloat16).save_pretrained(folder, variant=variant, max_shard_size="200KB")
    index = "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    assert (folder / "unet" / index).is_file() and len(list((folder / "unet").glob("*.safetensors"))) > 2
    return folder


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_denoiser_weights_are_found_with_their_dtype(variant, tmp_path):
    folder = _sharded(tmp_path / "sharded", variant)
    assert choose_variant(folder, None) == variant
    assert source_unet_dtype(str(folder)) == torch.bfloat16  # what a slim UNet of it is saved in


def test_a_sharded_folder_slims_and_its_slim_folder_reopens_it(tmp_path, capsys):
    folder = _sharded(tmp_path / "sharded", None)
    out = tmp_path / "slim"
    assert main(["slim", "--model", str(folder), *FAST, "--out", str(out)]) == 0
    assert stored_dtype(out / "diffusion_pytorch_model.safetensors") == torch.bfloat16
    assert load_pipeline(str(out), torch.bfloat16).unet.slim_plan.params_removed > 0  # reopens its sharded source
