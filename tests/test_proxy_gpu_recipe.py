"""The one-GPU proxy recipe's parts: horizontal-flip augmentation, bulk rendering, step budget, the budgeted run."""

import time

import numpy as np
import pytest
import torch

from slimdiff.proxy import shapes
from slimdiff.proxy.analyzer import analyze, score
from slimdiff.proxy.shapes import (
    flip_allowed,
    flip_caption,
    flip_scene,
    heldout_compositions,
    render,
    render_parallel,
    render_range,
    sample_scene,
)


def test_flipped_image_matches_swapped_caption():
    horizontal = 0
    for i in range(120):
        s = sample_scene(0, i, "train")
        img = render(s)
        if score(s, analyze(img))[0] != score(s, analyze(img))[1]:  # the analyzer misreads the original
            continue
        f = flip_scene(s)
        mirrored = img[:, ::-1]
        assert f.caption == flip_caption(s.caption)
        found, total, detail = score(f.caption, analyze(mirrored))
        assert found == total, (s.caption, f.caption, detail)
        # the scene's own ground truth: relation from the mirrored centres, attributes unchanged
        assert shapes.parse_caption(f.caption) == f.attributes()
        if len(f.objects) == 2:
            a, b = f.objects
            dx, dy = a.cx - b.cx, a.cy - b.cy
            rel = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
            assert rel == f.relation
            if s.relation in ("left of", "right of"):
                horizontal += 1
                assert f.relation != s.relation
                if a.phrase() != b.phrase():  # the unswapped caption no longer fits the mirrored image
                    assert score(s.caption, analyze(mirrored))[0] < total
            else:
                assert f.relation == s.relation and f.caption == s.caption
    assert horizontal > 20


def test_flip_never_yields_a_heldout_composition():
    held = heldout_compositions()
    dropped = 0
    for i in range(2000):
        s = sample_scene(0, i, "train")
        if flip_allowed(s):
            assert len(s.objects) == 1 or flip_scene(s).composition not in held
        else:
            dropped += 1
            assert flip_scene(s).composition in held and s.relation in ("left of", "right of")
    assert dropped > 0
    assert flip_caption("a small red circle above a large blue square") == "a small red circle above a large blue square"
    assert flip_caption("a large green triangle") == "a large green triangle"
    assert flip_caption("a small red circle left of a large blue square") == "a small red circle right of a large blue square"


def test_parallel_render_equals_serial():
    imgs, caps, ok = render_parallel(300, seed=2, processes=2, chunk=128)
    ref = render_range((2, 0, 300, "train", shapes.P_SINGLE))
    assert np.array_equal(imgs, ref[0]) and caps == ref[1] and np.array_equal(ok, ref[2])
    assert caps[7] == sample_scene(2, 7).caption


def test_step_budget_fits_steps_to_time(monkeypatch):
    from slimdiff.proxy import train as ptrain
    from slimdiff.proxy.train import _StepBudget

    # A fake clock where every step takes exactly 10 ms: the budget logic is under test, not how precisely a
    # loaded machine sleeps (real sleeps overshot the tolerance under load).
    clock = [1000.0]
    monkeypatch.setattr(ptrain.time, "time", lambda: clock[0])
    b = _StepBudget(0.5, cap=10_000, device="cpu", measure=(2, 6))
    step = 0
    while step < b.update(step):
        assert b.progress(step) == 0.0 or b.fixed
        clock[0] += 0.01
        step += 1
        if b.over():
            break
    assert b.fixed and 20 <= b.total <= 60 and b.step_time == pytest.approx(0.01, rel=0.5)
    assert step == b.total or b.over()


def test_encode_with_hflip_adds_mirrors_with_swapped_captions(tmp_path):
    from slimdiff.proxy import tokenizer as ptok
    from slimdiff.proxy import train as ptrain

    cfg = ptrain.ProxyConfig(**{**ptrain.TINY, "n_latents": 24, "hflip": True})
    tok = ptok.build_tokenizer(tmp_path)
    torch.manual_seed(0)
    _, vae, _ = ptrain.build_models(cfg, tok)
    vae.eval()
    lat, ids = ptrain.encode_dataset(vae, tok, cfg, "cpu", ptrain._Log(quiet=True))
    scenes = [sample_scene(0, i) for i in range(24)]
    ok = [s for s in scenes if flip_allowed(s)]
    assert lat.shape[0] == ids.shape[0] == 24 + len(ok)
    want = [s.caption for s in scenes] + [flip_scene(s).caption for s in ok]
    assert torch.equal(ids, ptrain.tokenize_captions(tok, want))
    with torch.no_grad():
        x = ptrain._images_to_tensor(render(ok[0])[None, :, ::-1].copy())
        assert (lat[24] - vae.encode(x).latent_dist.mean[0]).abs().max() < 1e-3
        assert (lat[24] - lat[scenes.index(ok[0])]).abs().max() > 1e-2  # really the mirror


def test_budgeted_training_runs_within_its_deadline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from slimdiff.proxy import train as ptrain

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ptrain.ProxyConfig(**{**ptrain.TINY, "n_latents": 2100, "hflip": True, "ema_fraction": 0.1,
                                    "text_lr_mult": 1.5, "vae_steps": 10_000, "unet_steps": 10_000})
        t0 = time.time()
        summary = ptrain.train_budgeted(cfg, tmp_path / "proxy", device="cpu", deadline=t0 + 14, reserve=2.0,
                                        vae_seconds=1.5, processes=2, log=ptrain._Log(quiet=True))
        assert summary["n_scenes"] == 2100 and summary["n_train_latents"] > 2100
        # The deadline, not the 10,000 steps asked for, sets how long the UNet trains: the plan fits the time
        # left and the loop stops at the deadline if the plan was too hopeful. (Checked on the steps, not on the
        # wall clock: CI shares its two cores, so a time bound here would test the machine's load.)
        unet = summary["unet"]
        assert 1 <= unet["steps_done"] < cfg.unet_steps
        assert unet["steps_done"] == unet["steps_planned"] or unet["stopped"]
        assert set(summary["stage_seconds"]) >= {"render", "vae", "encode", "unet", "save"}
        pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "proxy"))
        assert pipe.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    finally:
        torch.set_num_threads(prev)
