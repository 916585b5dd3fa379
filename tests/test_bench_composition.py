"""The composition benchmarks: bench/deepcache_composition.py (DeepCache's cached calls counted on weightless UNets)
and bench/quantization_composition.py (torchao INT8 on dense and slim UNets), each dry-run whole on the trained proxy
with a few prompts and steps, writing its report."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("DeepCache")
    return _script("deepcache_composition")


def test_a_cached_call_runs_only_what_deepcache_keeps_and_slimming_shrinks_only_its_transformer_blocks(bench):
    """The full call is count_macs' call; a cached call runs a small part of it. Slimming shrinks a cached call only
    where the outermost up layer holds a transformer block: SD's last up block does (CrossAttnUpBlock2D), SDXL's
    does not (UpBlock2D)."""
    from export_support import TWO_LEVEL_XL_UNET

    from slimdiff.bench.macs import count_macs, meta_unet
    from slimdiff.bench.plans import transformer_mac_plan
    from slimdiff.configs import TINY_UNET

    for config, last_up_attends in ((TINY_UNET, True), (TWO_LEVEL_XL_UNET, False)):
        assert (config["up_block_types"][-1] == "CrossAttnUpBlock2D") is last_up_attends
        dense = meta_unet(config)
        full, cached = bench.deepcache_step_macs(dense, 0, (16, 16))
        assert full == count_macs(dense, 2, (16, 16)).total and 0 < cached < full / 3
        slim = meta_unet(config, transformer_mac_plan(dense, 0.5, (16, 16)))
        slim_full, slim_cached = bench.deepcache_step_macs(slim, 0, (16, 16))
        assert slim_full < full
        assert (slim_cached < cached) if last_up_attends else (slim_cached == cached)


def test_dry_run_writes_the_report(bench, tmp_path):
    out = tmp_path / "report"
    # builtin:tiny (seeded weights) for the report's structure: the proxy's figures are the script's own runs
    rc = bench.main(["--model", "builtin:tiny", "--calib-prompts", "4", "--eval-prompts", "2", "--steps", "4",
                     "--intervals", "2", "--pairs", "2",
                     "--warmup", "0", "--ideal-models", "builtin:sd15-shape", "--ideal-fractions", "0.4",
                     "--ideal-steps", "10", "--out", str(out)])
    assert rc == 0
    body = json.loads((out / "deepcache_composition.json").read_text())
    assert list(body["variants"]) == ["slim", "dense + DeepCache 2", "slim + DeepCache 2"]
    assert "psnr_db_vs_dense_with_the_same" in body["variants"]["slim + DeepCache 2"]
    assert all(v["speedup"]["pairs"] == 2 for v in body["variants"].values())
    (row,) = body["ideal"]["rows"]
    assert row["full_steps"] == 5 and row["image_px"] == 512
    ideal = row["ideal_speedup"]
    assert 1 < ideal["slim"] < ideal["slim + DeepCache"] and 1 < ideal["dense + DeepCache"] < ideal["slim + DeepCache"]
    assert "| builtin:sd15-shape | 512² | 40% | 2 |" in (out / "deepcache_composition.md").read_text()


def test_int8_linears_take_a_quarter_of_the_bytes_and_the_dry_run_writes_the_report(tmp_path):
    pytest.importorskip("torchao")
    bench = _script("quantization_composition")
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    dense_bytes = bench.linear_weight_bytes(model)
    assert dense_bytes == 4 * (64 * 32 + 32 * 16)
    int8 = bench.quantized(model, "Int8WeightOnlyConfig")
    # INT8 values and one scale per output channel (torchao's inner tensors), the float model untouched
    assert dense_bytes / 4 <= bench.linear_weight_bytes(int8) < dense_bytes / 3
    assert bench.linear_weight_bytes(model) == dense_bytes
    out = tmp_path / "report"
    assert bench.main(["--model", "builtin:tiny", "--calib-prompts", "4", "--eval-prompts", "2", "--steps", "3",
                       "--out", str(out)]) == 0
    variants = json.loads((out / "quantization_composition.json").read_text())["variants"]
    assert list(variants) == ["dense", "slim", "dense + INT8 weight-only", "slim + INT8 weight-only",
                              "dense + INT8 W8A8 dynamic", "slim + INT8 W8A8 dynamic"]
    assert variants["slim + INT8 weight-only"]["linear_weight_bytes"] < variants["slim"]["linear_weight_bytes"] / 3
    assert "psnr_db_vs_dense_with_the_same" in variants["slim + INT8 W8A8 dynamic"]
    assert "| slim + INT8 weight-only |" in (out / "quantization_composition.md").read_text()
