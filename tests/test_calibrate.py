import fcntl
import json
import os

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
    # as a version whose configuration had no refiner fields wrote it: it resumes all the same
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    for field in ("base", "refiner_start"):
        del manifest["config"][field]
    (tmp_path / "resumed" / "manifest.json").write_text(json.dumps(manifest))
    # While another calibration holds the folder (its lock is on its own open of the folder, as another process's
    # would be), a second one is refused before it samples or writes anything.
    before = {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir() if p.is_file()}
    other = os.open(tmp_path / "resumed", os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SlimDiffError, match="is being written by another calibration now"):
            calibrate(pipe, prompts, tmp_path / "resumed", CONFIG, progress=False,
                      on_batch=lambda s, d: pytest.fail("sampled under another calibration's lock"))
    finally:
        os.close(other)
    assert {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir() if p.is_file()} == before
    seen = []
    calibrate(pipe, prompts, tmp_path / "resumed", CONFIG, progress=False, on_batch=lambda s, d: seen.append((s, d)))
    assert seen == [("pass2", 3), ("pass2", 4)]  # only the unfinished batches ran again
    # Complete statistics are read again without the lock, and without a write: two jobs reusing one folder at
    # once (the first one's lock held) both get them.
    done = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "resumed").iterdir() if p.is_file()}
    other = os.open(tmp_path / "resumed", os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        reused = calibrate(pipe, prompts, tmp_path / "resumed", CONFIG, progress=False,
                           on_batch=lambda s, d: pytest.fail("complete statistics sampled again"))
    finally:
        os.close(other)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "resumed").iterdir()
            if p.is_file()} == done
    assert all(torch.equal(reused.tensors[k], v) for k, v in full.tensors.items())
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
    # every site has weights over the timesteps (FFN, and both groups of each attention)
    assert {f"{key}.ff", f"{key}.attn1.qk", f"{key}.attn1.vo", f"{key}.attn2.qk"} <= set(stats.timestep_weights)
    for w in stats.timestep_weights.values():
        assert w.shape == (T,) and torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    moment = stats.tensors[f"{key}.ff.moment"] / stats.tensors[f"{key}.ff.moment_norm"]
    assert torch.allclose(moment, moment.T) and torch.linalg.eigvalsh(moment).min() > -1e-9
    # every cross-attention reads the UNet's text context unchanged: one moment for all of them
    assert stats.tensors["text_context.moment"].shape == (64, 64)
    assert not [k for k in stats.tensors if k.endswith(".ctx")]
    cross = stats.attention(f"{key}.attn2")
    assert torch.allclose(cross.context_moment, stats.tensors["text_context.moment"] / stats.tensors["text_context.tokens"])
    assert cross.context_norm == stats.tensors[f"{key}.attn2.ctx_tokens"]  # each read the context once per call
    # per timestep only head-sized Grams; the C×C input moments are weighted over timesteps, one per site
    assert stats.tensors[f"{key}.attn2.z_gram"].shape == (T, 2, 16, 16)
    assert stats.tensors[f"{key}.attn1.q_gram"].shape == stats.tensors[f"{key}.attn1.k_gram"].shape == (T, 2, 16, 16)
    assert stats.tensors[f"{key}.attn2.k_gram"].shape == (2, 16, 16)  # text keys: one for all timesteps
    assert stats.tensors[f"{key}.attn1.qk_moment"].shape == stats.tensors[f"{key}.attn1.vo_moment"].shape == (32, 32)
    assert f"{key}.attn2.vo_moment" not in stats.tensors  # a cross-attention's values come from the text moment


def test_attention_trq_from_grams_equals_the_trq_of_per_timestep_moments():
    """The Grams calibration keeps per timestep give the same ρ_t as the C×C moments they replace."""
    from slimdiff.analyze import trq_qk
    from slimdiff.calibrate import site_trq
    from slimdiff.families import QK, module_sites, site_linears, transformer_blocks

    pipe = build_builtin("builtin:tiny")
    unet = pipe.unet
    config = CalibrationConfig(steps=3, pass1_prompts=1, batch_size=1)
    moments: dict = {}

    path, block, adapter = transformer_blocks(unet)[0]
    taps = {tap.sublayer: tap for tap in adapter.taps(block)}

    def record(sublayer):
        def hook(_m, args, kwargs):
            x, ctx = taps[sublayer].read_inputs(args, kwargs)
            t = int(torch.as_tensor(unet_timestep[0]).flatten()[0])
            entry = moments.setdefault((sublayer, t), [0, 0, 0, 0])
            x64 = x.reshape(-1, x.shape[-1]).double()
            entry[0] += x64.T @ x64
            entry[1] += x64.shape[0]
            if ctx is not None:
                c64 = ctx.reshape(-1, ctx.shape[-1]).double()
                entry[2] += c64.T @ c64
                entry[3] += c64.shape[0]
        return hook

    unet_timestep = [None]
    handles = [unet.register_forward_pre_hook(
        lambda _m, args, kwargs: unet_timestep.__setitem__(0, kwargs.get("timestep", args[1] if len(args) > 1 else None)),
        with_kwargs=True)]
    handles += [taps[name].attention.register_forward_pre_hook(record(name), with_kwargs=True) for name in ("attn1", "attn2")]
    try:
        stats = calibrate(pipe, read_prompts(limit=1), None, config, progress=False)
    finally:
        for h in handles:
            h.remove()
    for site in (s for s in module_sites(unet) if s.kind == QK and s.block == path):
        lin = site_linears(unet, site)
        wq, wk = lin.q.weight.detach().double(), lin.k.weight.detach().double()
        per_t = []
        for t in stats.timesteps:
            sx, nx, sy, ny = moments[(site.attn, t)]
            sigma_x = sx / nx
            sigma_y = sy / ny if ny else sigma_x

            def grams(w, sigma):
                w = w.reshape(site.heads, -1, w.shape[1])
                return torch.einsum("hac,cd,hbd->hab", w, sigma, w)

            per_t.append(trq_qk(wq, wk, grams(wq, sigma_x), grams(wk, sigma_y), sigma_x.trace(), sigma_y.trace(),
                                site.heads))
        # pass 2 saw the prompt once more: the same trajectory, so the same ratios
        torch.testing.assert_close(site_trq(unet, site, stats.tensors), torch.stack(per_t), rtol=1e-5, atol=0)


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


def _held_bytes(stats) -> int:
    return sum(t.numel() * t.element_size() for k, t in stats.tensors.items()
               if not k.startswith("pass1.") and k.endswith((".q_gram", ".k_gram", ".z_gram", "_moment", ".ctx",
                                                             ".moment")))


def test_statistics_size_is_known_before_calibrating(tiny_stats):
    from slimdiff.calibrate import statistics_bytes
    from slimdiff.models import load_unet

    predicted = statistics_bytes(load_unet("builtin:tiny"), len(tiny_stats.timesteps))
    assert sum(predicted.values()) == _held_bytes(tiny_stats)


def test_sdxl_statistics_size_is_known_and_its_cross_attentions_share_the_text_moment():
    from slimdiff.calibrate import statistics_bytes

    pipe = build_builtin("builtin:tiny-xl")
    stats = calibrate(pipe, read_prompts(limit=1), None, CONFIG, progress=False)
    assert "text_context.moment" in stats.tensors and not [k for k in stats.tensors if k.endswith(".ctx")]
    assert sum(statistics_bytes(pipe.unet, len(stats.timesteps)).values()) == _held_bytes(stats)


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


def test_cross_attentions_reading_their_own_context_keep_their_own_moment(monkeypatch):
    """The shared text moment is a storage saving, not an approximation: a family whose cross-attentions do not
    read the call's context tensor keeps one per attention, with the same values."""
    from slimdiff.families import CROSS, QK, module_sites
    from slimdiff.families.sd import StableDiffusionFamily

    prompts = read_prompts(limit=2)
    shared = calibrate(build_builtin("builtin:tiny"), prompts, None, CONFIG, progress=False)
    monkeypatch.setattr(StableDiffusionFamily, "text_context", lambda self, args, kwargs: None)
    own = calibrate(build_builtin("builtin:tiny"), prompts, None, CONFIG, progress=False)
    assert "text_context.moment" in shared.tensors and "text_context.moment" not in own.tensors
    crosses = [s for s in module_sites(build_builtin("builtin:tiny").unet) if s.kind == QK and s.attention == CROSS]
    assert crosses
    for site in crosses:
        assert f"{site.sublayer_path}.ctx" in own.tensors
        torch.testing.assert_close(own.attention(site.sublayer_path).context_moment,
                                   shared.attention(site.sublayer_path).context_moment, rtol=1e-12, atol=0)


def test_statistics_of_another_format_version_are_refused_with_what_to_do(tmp_path):
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "slimdiff-stats/1", "complete": True}))
    with pytest.raises(SlimDiffError, match=r"another slimdiff version \(format slimdiff-stats/1.*calibrate again"):
        Statistics.load(tmp_path)
    with pytest.raises(SlimDiffError, match="another slimdiff version"):  # and a resume into it
        calibrate(build_builtin("builtin:tiny"), ["a cat"], tmp_path, CONFIG, progress=False)


def test_a_calibration_whose_checkpoints_will_not_fit_on_disk_is_refused_before_the_first_prompt(
        tmp_path, monkeypatch):
    from collections import namedtuple

    import slimdiff.calibrate as calibration

    pipe = build_builtin("builtin:tiny")
    need = 2 * sum(calibration.statistics_bytes(pipe.unet, CONFIG.steps).values())  # at least: statistics twice
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(calibration.shutil, "disk_usage", lambda path: usage(10 * need, 9 * need, need // 2))
    with pytest.raises(SlimDiffError, match=r"calibration checkpoints need about .* GB on the file system of"):
        calibrate(pipe, read_prompts(limit=2), tmp_path / "stats", CONFIG, progress=False,
                  on_batch=lambda s, d: pytest.fail("sampled although the checkpoints cannot be written"))
    assert not (tmp_path / "stats").exists()  # the folder made for the run is not left behind
