"""Site shards: statistics too large for memory, collected a share of the sub-layers at a time.

That sharded statistics equal one calibration's, bit for bit, is checked for every family by the conformance
suite (tests/test_conformance.py); here: how shards are planned and sized, resumed and refused, and the command."""

from __future__ import annotations

import json

import pytest
import torch

import slimdiff.devices as devices
from slimdiff.calibrate import (
    CalibrationConfig,
    Statistics,
    calibrate,
    pipeline_loop,
    plan_site_shards,
    site_shards_for,
    statistics_bytes,
)
from slimdiff.cli import main
from slimdiff.errors import SlimDiffError
from slimdiff.families import module_sites
from slimdiff.models import build_builtin

CONFIG = CalibrationConfig(steps=2, pass1_prompts=1, batch_size=1)
PROMPTS = ["a red cube", "two blue spheres"]


def _bytes(unet, group) -> int:
    return sum(statistics_bytes(unet, CONFIG.steps, group).values())


def _no_sampling(prompts, seeds):
    raise AssertionError("a prompt was sampled")


def test_shards_cover_every_sublayer_once_and_balance_their_bytes():
    unet = build_builtin("builtin:tiny").unet
    sublayers = list(dict.fromkeys(s.sublayer_path for s in module_sites(unet)))
    plan = plan_site_shards(unet, CONFIG.steps, 3)
    assert sorted(p for group in plan for p in group) == sorted(sublayers)
    loads = [sum(_bytes(unet, {p}) for p in group) for group in plan]
    largest_item = max(_bytes(unet, {p}) for p in sublayers)
    assert max(loads) - min(loads) <= largest_item  # greedy largest-first onto the lightest shard
    assert plan == plan_site_shards(unet, CONFIG.steps, 3)  # deterministic: a resumed run finds the same shards
    with pytest.raises(SlimDiffError, match="between 1 and"):
        plan_site_shards(unet, CONFIG.steps, len(sublayers) + 1)


def test_auto_takes_the_fewest_shards_that_fit(monkeypatch):
    unet = build_builtin("builtin:tiny").unet  # on the CPU the host holds a shard's sums twice
    whole = _bytes(unet, None)
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 2 * whole)
    assert site_shards_for(unet, CONFIG.steps, "auto") is None  # everything fits: one ordinary run
    limit = whole  # the host can hold half of the statistics (twice)
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: limit)
    plan = site_shards_for(unet, CONFIG.steps, "auto")
    assert plan is not None and all(2 * _bytes(unet, group) <= limit for group in plan)
    fewer = plan_site_shards(unet, CONFIG.steps, len(plan) - 1)
    assert any(2 * _bytes(unet, group) > limit for group in fewer)
    with pytest.raises(SlimDiffError, match=r"this site shard .* --site-shards"):  # a count that does not fit
        site_shards_for(unet, CONFIG.steps, len(plan) - 1)


def test_shards_that_cannot_fit_are_refused_before_the_first_prompt(monkeypatch):
    pipe = build_builtin("builtin:tiny")
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 1000)
    with pytest.raises(SlimDiffError, match="this site shard"):
        calibrate(pipe, PROMPTS, None, CONFIG, loop=_no_sampling, progress=False, site_shards="auto")


def test_sharded_statistics_go_to_disk_and_a_folder_keeps_its_layout(tmp_path):
    pipe = build_builtin("builtin:tiny")
    with pytest.raises(SlimDiffError, match="give an output directory"):
        calibrate(pipe, PROMPTS, None, CONFIG, loop=_no_sampling, progress=False, site_shards=2)
    stats = calibrate(pipe, PROMPTS, tmp_path / "s", CONFIG, progress=False, site_shards=2)
    # A finished run resumes to the same statistics without sampling again.
    again = calibrate(pipe, PROMPTS, tmp_path / "s", CONFIG, loop=_no_sampling, progress=False, site_shards=2)
    assert all(torch.equal(again.tensors[k], stats.tensors[k]) for k in stats.tensors)
    with pytest.raises(SlimDiffError, match="other site shards"):
        calibrate(pipe, PROMPTS, tmp_path / "s", CONFIG, loop=_no_sampling, progress=False, site_shards=3)
    with pytest.raises(SlimDiffError, match="holds site shards"):
        calibrate(pipe, PROMPTS, tmp_path / "s", CONFIG, loop=_no_sampling, progress=False)
    calibrate(pipe, PROMPTS, tmp_path / "one", CONFIG, progress=False)
    with pytest.raises(SlimDiffError, match="unsharded calibration"):
        calibrate(pipe, PROMPTS, tmp_path / "one", CONFIG, loop=_no_sampling, progress=False, site_shards=2)


def test_an_interrupted_shard_resumes_and_a_lone_shard_is_refused(tmp_path):
    pipe = build_builtin("builtin:tiny")
    config = CalibrationConfig(steps=2, pass1_prompts=1, batch_size=1, checkpoint_every=1)
    calls = []
    sample = pipeline_loop(pipe, config)

    def dies_in_the_second_shard(prompts, seeds):
        calls.append(prompts)
        if len(calls) == 4:  # shard 1: pass 1 (one prompt) + pass 2 (two); shard 2 dies in its pass 1
            raise KeyboardInterrupt
        sample(prompts, seeds)

    with pytest.raises(KeyboardInterrupt):
        calibrate(pipe, PROMPTS, tmp_path / "s", config, loop=dies_in_the_second_shard, progress=False, site_shards=2)
    with pytest.raises(SlimDiffError, match="incomplete"):
        Statistics.load(tmp_path / "s")
    first = json.loads((tmp_path / "s/shard-0-of-2/manifest.json").read_text())
    assert first["complete"] and first["site_shard"]["index"] == 0
    resumed_calls = []

    def counted(prompts, seeds):
        resumed_calls.append(prompts)
        sample(prompts, seeds)

    stats = calibrate(pipe, PROMPTS, tmp_path / "s", config, loop=counted, progress=False, site_shards=2)
    assert len(resumed_calls) == 3  # the finished shard is not sampled again
    whole = calibrate(pipe, PROMPTS, None, config, progress=False)
    assert all(torch.equal(stats.tensors[k], whole.tensors[k]) for k in whole.tensors)
    lone = Statistics.load(tmp_path / "s/shard-1-of-2")
    with pytest.raises(SlimDiffError, match="cover .* of the model's sites"):
        lone.check_model(pipe.unet)


def test_calibrate_command_with_site_shards_then_slim(tmp_path, capsys):
    stats = tmp_path / "stats"
    main(["calibrate", "--model", "builtin:tiny", "--device", "cpu", "--num-prompts", "2", "--steps", "2",
          "--pass1-prompts", "1", "--site-shards", "2", "--out", str(stats)])
    assert "written to" in capsys.readouterr().out
    assert json.loads((stats / "shards.json").read_text())["format"] == "slimdiff-stats-shards/1"
    main(["slim", "--model", "builtin:tiny", "--device", "cpu", "--stats", str(stats), "--budget", "0.3",
          "--out", str(tmp_path / "slim")])
    assert (tmp_path / "slim" / "slim_report.json").is_file()
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "builtin:tiny", "--site-shards", "some", "--out", str(tmp_path / "x")])
    assert "a count or 'auto'" in capsys.readouterr().err


def test_flux_dev_statistics_in_shards_that_fit_an_80_gb_gpu():
    """FLUX.1-dev's statistics (105 GB over 25 timesteps) cannot be held by one 80 GB GPU; two balanced shards
    can — shapes only (meta device)."""
    from slimdiff.bench.macs import meta_unet
    from slimdiff.models import BUILTIN_DENOISER_CONFIGS

    transformer = meta_unet(BUILTIN_DENOISER_CONFIGS["builtin:flux-dev-shape"])
    whole = sum(statistics_bytes(transformer, 25).values())
    assert whole > 80e9
    plan = plan_site_shards(transformer, 25, 2)
    assert max(sum(statistics_bytes(transformer, 25, group).values()) for group in plan) < 60e9


def test_slimming_from_disk_reads_a_sites_moments_only_when_it_decomposes_it(tmp_path, monkeypatch):
    """What keeps slimming's memory at one site's moments: analysis reads the per-timestep statistics only, and
    the decomposition of a site reads that site's moments and no other's."""
    from slimdiff.calibrate import StoredTensors
    from slimdiff.families import FFN
    from slimdiff.slim import SlimConfig, analyze_sites, decompose_site

    pipe = build_builtin("builtin:tiny")
    calibrate(pipe, PROMPTS, tmp_path / "s", CONFIG, progress=False)
    stats = Statistics.load(tmp_path / "s")
    read = []
    original = StoredTensors.__getitem__
    monkeypatch.setattr(StoredTensors, "__getitem__", lambda self, key: read.append(key) or original(self, key))
    sites = module_sites(pipe.unet)
    analyses = analyze_sites(pipe.unet, stats, sites)
    assert [k for k in read if k.endswith(("moment", ".ctx"))] == []
    ffn = next(s for s in sites if s.kind == FFN)
    read.clear()
    decompose_site(pipe.unet, analyses[ffn.name], ffn.width // 2, SlimConfig())
    assert f"{ffn.sublayer_path}.moment" in read
    assert [k for k in read if not k.startswith(ffn.sublayer_path + ".")] == []
