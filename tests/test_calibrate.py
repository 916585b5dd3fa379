import pytest
import torch

from slimdiff.calibrate import CalibrationConfig, Statistics, calibrate
from slimdiff.errors import SlimDiffError
from slimdiff.models import build_builtin
from slimdiff.prompts import read_prompts

CONFIG = CalibrationConfig(steps=3, pass1_prompts=2, batch_size=1, checkpoint_every=1)


class Stop(Exception):
    pass


def test_resumed_calibration_is_bit_identical(tmp_path):
    prompts = read_prompts(limit=4)
    pipe = build_builtin("builtin:tiny")
    full = calibrate(pipe, prompts, tmp_path / "full", CONFIG, progress=False)

    def stop_after(stage, done):
        if stage == "pass2" and done == 2:
            raise Stop

    with pytest.raises(Stop):
        calibrate(pipe, prompts, tmp_path / "resumed", CONFIG, progress=False, on_batch=stop_after)
    with pytest.raises(SlimDiffError, match="incomplete"):
        Statistics.load(tmp_path / "resumed")
    seen = []
    calibrate(pipe, prompts, tmp_path / "resumed", CONFIG, progress=False, on_batch=lambda s, d: seen.append((s, d)))
    assert seen == [("pass2", 3), ("pass2", 4)]  # only the unfinished batches ran again
    resumed = Statistics.load(tmp_path / "resumed")
    again = Statistics.load(tmp_path / "full")
    assert resumed.timesteps == full.timesteps == again.timesteps
    assert set(resumed.tensors) == set(full.tensors)
    for key, value in full.tensors.items():
        assert torch.equal(resumed.tensors[key], value), key
        assert torch.equal(again.tensors[key], value), key


def test_statistics_content(tiny_stats):
    stats = tiny_stats
    T = len(stats.timesteps)
    assert T == 4 and sum(stats.visits) >= 4
    key = "down_blocks.0.attentions.0.transformer_blocks.0"
    # both CFG branches: 2 samples × 16×16 tokens per call, 6 prompts, each timestep visited `visits` times
    tokens = stats.tensors[f"{key}.attn1.in_tokens"]
    assert torch.equal(tokens, torch.tensor([2 * 256 * 6 * v for v in stats.visits], dtype=torch.float64))
    for w in stats.ffn_weights.values():
        assert w.shape == (T,) and torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    moment = stats.tensors[f"{key}.ff.moment"] / stats.tensors[f"{key}.ff.moment_norm"]
    assert torch.allclose(moment, moment.T) and torch.linalg.eigvalsh(moment).min() > -1e-9
    ctx = stats.tensors[f"{key}.attn2.ctx"]
    assert ctx.shape == (64, 64) and f"{key}.attn1.ctx" not in stats.tensors
    assert stats.tensors[f"{key}.attn2.z_gram"].shape == (T, 2, 16, 16)


def test_stats_from_another_model_are_refused(tmp_path, tiny_stats):
    other = build_builtin("builtin:tiny")
    with torch.no_grad():
        other.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2].weight.mul_(2)
    with pytest.raises(SlimDiffError, match="different model"):
        tiny_stats.check_model(other.unet)
    prompts = read_prompts(limit=2)
    calibrate(build_builtin("builtin:tiny"), prompts, tmp_path / "s", CONFIG, progress=False)
    with pytest.raises(SlimDiffError, match="different model"):
        calibrate(other, prompts, tmp_path / "s", CONFIG, progress=False)
    with pytest.raises(SlimDiffError, match="different"):
        calibrate(build_builtin("builtin:tiny"), prompts[:1], tmp_path / "s", CONFIG, progress=False)


def test_statistics_size_is_known_before_calibrating(tiny_stats):
    from slimdiff.calibrate import statistics_bytes
    from slimdiff.models import load_unet

    predicted = statistics_bytes(load_unet("builtin:tiny"), len(tiny_stats.timesteps))
    held = sum(t.numel() * t.element_size() for k, t in tiny_stats.tensors.items()
               if not k.startswith("pass1.") and k.endswith((".in", ".ctx", ".z_gram", ".moment")))
    assert sum(predicted.values()) == held


def test_a_calibration_whose_statistics_cannot_be_held_is_refused_before_the_first_prompt(monkeypatch):
    import slimdiff.devices as devices
    from slimdiff.calibrate import CalibrationConfig, calibrate, statistics_bytes
    from slimdiff.models import build_builtin

    pipe = build_builtin("builtin:tiny")
    need = sum(statistics_bytes(pipe.unet, 4).values())
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 2 * need - 1)

    def loop(prompts, seeds):
        raise AssertionError("a prompt was sampled before the memory check")

    with pytest.raises(SlimDiffError, match=r"over 4 timesteps .* need .* GB of host memory.* fewer --steps"):
        calibrate(pipe, ["a cat"], None, CalibrationConfig(steps=4), loop=loop, progress=False)
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 2 * need)
    with pytest.raises(AssertionError, match="a prompt was sampled"):
        calibrate(pipe, ["a cat"], None, CalibrationConfig(steps=4), loop=loop, progress=False)
