"""The benchmark's memory check: dense and slim UNet weights sized on the meta device, refused before loading."""

from pathlib import Path

import pytest
import torch

from slimdiff.bench import harness, memory
from slimdiff.bench.harness import BenchConfig, run_bench
from slimdiff.bench.plans import make_models
from slimdiff.devices import available_memory_bytes
from slimdiff.errors import SlimDiffError


@pytest.mark.parametrize("unit", ["params", "macs"])
def test_sizes_match_the_models_the_benchmark_builds(tiny_pipe, unit):
    unet = tiny_pipe.unet
    latent = memory.latent_size("builtin:tiny", dict(unet.config), None)
    counted = memory.unet_params(dict(unet.config), [0.0, 0.4, 0.6], unit, latent)
    built = make_models(unet, [0.0, 0.4, 0.6], unit=unit, latent=latent)
    assert counted == [sum(p.numel() for p in m.unet.parameters()) for m in built]
    assert counted[0] > counted[1] > counted[2]


def test_a_benchmark_that_cannot_fit_is_refused_before_anything_loads(monkeypatch):
    config = memory.unet_config("builtin:tiny")
    dense, slim = memory.unet_params(config, [0.0, 0.4], "params", memory.latent_size("builtin:tiny", config, None))
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 4 * (dense + slim) - 1)

    def no_loading(self):
        raise AssertionError("the pipeline was loaded before the memory check refused the run")

    monkeypatch.setattr(harness.Bench, "_load", no_loading)
    with pytest.raises(SlimDiffError, match=r"needs at least .* GB of host memory .* 1 slim copies .* available"):
        run_bench(BenchConfig(model="builtin:tiny", budgets=[0.0, 0.4], batches=[1], device="cpu",
                              dtype="float32", e2e=False), log=lambda msg: None)
    # fp16 halves the weights: the same run fits
    memory.check_fits("builtin:tiny", [0.0, 0.4], "params", None, "cpu", torch.float16)


def test_sources_without_a_readable_config_are_not_checked(tmp_path):
    assert memory.unet_config(str(tmp_path / "model.safetensors")) is None
    memory.check_fits(str(tmp_path / "model.safetensors"), [0.0, 0.4], "params", None, "cpu", torch.float32)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{not json")
    with pytest.raises(SlimDiffError, match="not valid JSON"):
        memory.unet_config(str(tmp_path))


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="no /proc/meminfo on this system")
def test_available_host_memory_is_read():
    assert available_memory_bytes("cpu") > 0
