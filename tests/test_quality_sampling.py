"""Noise-prediction error along the dense trajectory, on builtin:tiny with a few steps."""

import copy

import numpy as np
import pytest
import torch

from slimdiff.errors import SlimDiffError
from slimdiff.models import module_sites
from slimdiff.quality import EvalSettings, adherence, compare
from slimdiff.quality.evaluate import is_proxy, model_label, paired_delta
from slimdiff.quality.sampling import NoiseErrorProbe, generate
from slimdiff.rebuild import load_slim_weights
from slimdiff.slim import SlimConfig, analyze_sites, decompose_site

PROMPTS = ["a red bus", "two dogs on a beach", "a bowl of fruit"]
SETTINGS = EvalSettings(steps=3, guidance=7.5, batch_size=3)


def test_dense_against_a_copy_of_itself_is_exact(tiny_pipe):
    comp = compare(tiny_pipe, {"copy": copy.deepcopy(tiny_pipe.unet)}, PROMPTS, SETTINGS, progress=False)
    errors = comp.noise_errors["copy"]
    assert errors.shape == (3, len(comp.timesteps)) and len(comp.timesteps) == 4  # PNDM: steps + 1 calls
    assert np.all(errors == 0)
    assert np.array_equal(comp.dense, comp.slims["copy"])


def test_scaled_output_gives_the_known_relative_error(tiny_pipe):
    scaled = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():  # ε' = 1.1·ε exactly, so ‖ε' − ε‖ / ‖ε‖ = 0.1 at every call and image
        scaled.conv_out.weight.mul_(1.1)
        scaled.conv_out.bias.mul_(1.1)
    comp = compare(tiny_pipe, {"scaled": scaled}, PROMPTS, SETTINGS, progress=False)
    np.testing.assert_allclose(comp.noise_errors["scaled"], 0.1, rtol=1e-4)
    assert not np.array_equal(comp.dense, comp.slims["scaled"])  # its own trajectory does differ


def test_full_rank_decomposition_has_zero_noise_error(tiny_pipe, tiny_stats):
    slim = copy.deepcopy(tiny_pipe.unet)
    sites = module_sites(slim)
    analyses = analyze_sites(slim, tiny_stats, sites)
    tensors = {}
    for s in sites:
        tensors.update(decompose_site(slim, analyses[s.name], s.width, SlimConfig()).tensors)
    load_slim_weights(slim, {k: v.float() for k, v in tensors.items()})
    comp = compare(tiny_pipe, {"full": slim}, PROMPTS[:2], SETTINGS, progress=False)
    assert comp.noise_errors["full"].max() < 1e-5


def test_errors_and_images_do_not_depend_on_batching(tiny_pipe):
    other = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        other.conv_in.weight.add_(0.01 * torch.randn(other.conv_in.weight.shape, generator=torch.Generator().manual_seed(0)))
    one = compare(tiny_pipe, {"o": other}, PROMPTS, EvalSettings(steps=3, batch_size=1), progress=False)
    all_ = compare(tiny_pipe, {"o": other}, PROMPTS, EvalSettings(steps=3, batch_size=3), progress=False)
    np.testing.assert_allclose(one.noise_errors["o"], all_.noise_errors["o"], rtol=1e-3)
    np.testing.assert_allclose(one.dense, all_.dense, atol=1e-4)
    assert one.noise_errors["o"].min() > 0


def test_probe_refuses_the_dense_object_and_mismatched_seeds(tiny_pipe):
    with pytest.raises(SlimDiffError, match="copy"):
        NoiseErrorProbe(tiny_pipe.unet, {"same": tiny_pipe.unet})
    with pytest.raises(SlimDiffError, match="one seed per prompt"):
        generate(tiny_pipe, PROMPTS, [0], steps=2, guidance=7.5)


def test_adherence_of_ground_truth_renders_and_bad_prompts():
    from slimdiff.proxy.shapes import ShapesDataset, render

    ds = ShapesDataset(24, seed=3, split="heldout")
    scenes = [ds.scene(i) for i in range(24)]
    images = np.stack([render(s).astype(np.float32) / 255 for s in scenes])
    good = adherence(images, [s.caption for s in scenes])
    assert good["score"] >= 0.95
    shuffled = adherence(images, [s.caption for s in scenes[1:] + scenes[:1]])
    assert shuffled["score"] < good["score"] - 0.2
    delta = paired_delta(good, shuffled)
    assert delta["points"] == pytest.approx(100 * (shuffled["score"] - good["score"]))
    assert delta["images_worse"] > 12 and delta["stderr_points"] > 0
    blank = adherence(np.ones_like(images), [s.caption for s in scenes])  # nothing to find on white images
    assert blank["score"] == 0 and paired_delta(good, blank)["images_worse"] == sum(f > 0 for f in good["found"])
    with pytest.raises(SlimDiffError, match="shape-scene prompts"):
        adherence(images[:1], ["a photo of a cat"])


def test_model_labels(tmp_path):
    assert model_label("builtin:tiny").startswith("seeded random weights")
    assert not is_proxy(str(tmp_path))
    (tmp_path / "proxy_training.json").write_text("{}")
    assert is_proxy(str(tmp_path)) and model_label(str(tmp_path)).startswith("proxy model")
