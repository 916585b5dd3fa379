"""Models named by their Hub id are read from the Hugging Face cache (slimdiff.hub_cache), laid out as
huggingface_hub lays it out: blobs named by hash, a snapshot folder of symbolic links to them, ``refs/main``."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from test_lora import _kohya_lora

from slimdiff import cli
from slimdiff.errors import SlimDiffError
from slimdiff.hub_cache import looks_like_hub_id
from slimdiff.lora import LoraSpec, check_loras, fuse_loras
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.serialization import load_plan

FAST = ["--num-prompts", "3", "--steps", "2", "--pass1-prompts", "1", "--device", "cpu"]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_as_the_hub_does(folder: Path, cache: Path, repo_id: str) -> Path:
    """Move ``folder``'s files into ``cache`` as a snapshot of ``repo_id``; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        file.replace(blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding builtin:tiny as ``someone/tiny-sd`` and a single-file repository."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    build_builtin("builtin:tiny").save_pretrained(root / "tiny")
    _cache_as_the_hub_does(root / "tiny", cache, "someone/tiny-sd")
    (root / "single").mkdir()
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(4)}, str(root / "single" / "v1-5.safetensors"))
    _cache_as_the_hub_does(root / "single", cache, "someone/single-file")
    (root / "lora").mkdir()
    _kohya_lora(build_builtin("builtin:tiny"), root / "lora" / "style.safetensors")
    (root / "lora" / "README.md").write_text("a LoRA repository")
    _cache_as_the_hub_does(root / "lora", cache, "someone/style-lora")
    (root / "loras" / "v2").mkdir(parents=True)
    for seed, name in enumerate(("a.safetensors", "v2/b.safetensors")):
        _kohya_lora(build_builtin("builtin:tiny"), root / "loras" / name, seed=seed)
    _cache_as_the_hub_does(root / "loras", cache, "someone/two-loras")
    return cache


@pytest.fixture
def use_cache(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_what_reads_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spelled in ("stabilityai/stable-diffusion-xl-base-1.0", "someone/tiny_sd.v2"):
        assert looks_like_hub_id(spelled), spelled
    for spelled in ("/abs/model", "./a/b", "a/b/c", "builtin:tiny", "model.safetensors", "a/", "../x"):
        assert not looks_like_hub_id(spelled), spelled
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not looks_like_hub_id("owner/name")  # a folder of that name is taken as the folder


def test_a_cached_hub_id_slims_and_its_folder_reloads_from_the_cache(use_cache, tmp_path, capsys):
    snapshot = use_cache / "models--someone--tiny-sd" / "snapshots" / REVISION
    lora = use_cache / "models--someone--style-lora" / "snapshots" / REVISION / "style.safetensors"
    out = tmp_path / "slim"
    assert cli.main(["slim", "--model", "someone/tiny-sd", "--lora", "someone/style-lora:0.5", *FAST, "--budget", "0.3",
                     "--out", str(out)]) == 0
    assert f"someone/tiny-sd: the Hugging Face cache's snapshot {snapshot}" in capsys.readouterr().err
    info = load_plan(out).info
    assert info["source_model"] == str(snapshot)  # the files it came from, revision and all
    # the LoRA by its path in the snapshot (the blob it links to has no .safetensors suffix)
    record, = info["source_loras"]
    assert record["path"] == str(lora) and record["scale"] == 0.5
    reloaded = load_pipeline(str(out))  # the dense pipeline read again from the snapshot, the LoRA fused, slim UNet
    size = sum(p.numel() for p in reloaded.unet.parameters())
    assert size < sum(p.numel() for p in build_builtin("builtin:tiny").unet.parameters())
    # the API takes the id too, and reads the same weights as the model that was cached
    cached = load_pipeline("someone/tiny-sd").unet.state_dict()
    dense = build_builtin("builtin:tiny").unet.state_dict()
    assert cached.keys() == dense.keys() and all(torch.equal(cached[k], dense[k]) for k in dense)


def test_an_id_the_cache_lacks_is_one_line_naming_what_it_holds(use_cache, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["slim", "--model", "someone/tiny-sdxl", *FAST, "--budget", "0.3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimdiff: error: model path 'someone/tiny-sdxl' does not exist"), err
    assert f"({use_cache})" in err[0] and "it holds someone/single-file, someone/style-lora" in err[0], err
    assert "hf download someone/tiny-sdxl --local-dir DIR" in err[0]
    assert not out.exists()


def test_a_single_file_repository_names_its_checkpoint(use_cache, tmp_path, capsys):
    code = cli.main(["slim", "--model", "someone/single-file", *FAST, "--budget", "0.3", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].endswith("holds v1-5.safetensors: pass the checkpoint file itself"), err


def test_the_cache_layout_is_the_hubs(hub_cache):
    """The fixture builds what huggingface_hub itself reads: its cache scanner finds both repositories whole."""
    from huggingface_hub import scan_cache_dir

    report = scan_cache_dir(hub_cache)
    assert not report.warnings
    repos = {repo.repo_id: repo for repo in report.repos}
    assert sorted(repos) == ["someone/single-file", "someone/style-lora", "someone/tiny-sd", "someone/two-loras"]
    revision, = repos["someone/tiny-sd"].revisions
    assert revision.refs == frozenset({"main"})
    index = json.loads((revision.snapshot_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_loras_are_named_by_hub_id_too(use_cache, tmp_path, capsys):
    snapshot = use_cache / "models--someone--style-lora" / "snapshots" / REVISION
    spec = LoraSpec.parse("someone/style-lora:0.5")  # the repository's one .safetensors file
    assert spec == LoraSpec(str(snapshot / "style.safetensors"), 0.5)
    assert "the Hugging Face cache's" in capsys.readouterr().err
    from_cache, from_file = build_builtin("builtin:tiny"), build_builtin("builtin:tiny")
    fuse_loras(from_cache, [spec])
    fuse_loras(from_file, [LoraSpec(str(snapshot / "style.safetensors"), 0.5)])
    changed, base = from_cache.unet.state_dict(), build_builtin("builtin:tiny").unet.state_dict()
    assert all(torch.equal(v, changed[k]) for k, v in from_file.unet.state_dict().items())
    assert any(not torch.equal(v, changed[k]) for k, v in base.items())
    two = use_cache / "models--someone--two-loras" / "snapshots" / REVISION
    assert LoraSpec.parse("someone/two-loras/v2/b.safetensors").path == str(two / "v2" / "b.safetensors")
    with pytest.raises(SlimDiffError, match=r"snapshot of someone/two-loras holds a.safetensors, v2/b.safetensors; "
                                            r"name the file as someone/two-loras/FILE"):
        LoraSpec.parse("someone/two-loras")
    with pytest.raises(SlimDiffError, match="has no c.safetensors"):
        LoraSpec.parse("someone/two-loras/c.safetensors:0.8")
    with pytest.raises(SlimDiffError, match=r"LoRA file 'someone/elsewhere/x.safetensors' does not exist, and the "
                                            r"Hugging Face cache .* has no snapshot of someone/elsewhere"):
        check_loras([LoraSpec.parse("someone/elsewhere/x.safetensors:0.8")])
