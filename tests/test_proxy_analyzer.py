"""The classical-vision analyzer reads ground-truth renders (≥ 95 % attribute accuracy)."""

import numpy as np
from PIL import Image, ImageFilter

from slimdiff.proxy.analyzer import analyze, attribute_accuracy, score
from slimdiff.proxy.shapes import ShapesDataset


def test_ground_truth_renders_at_least_95_percent():
    for split, seed in (("train", 11), ("heldout", 12)):
        images, _, scenes = ShapesDataset(250, seed, split).batch(0, 250)
        acc, per_kind = attribute_accuracy(images, scenes)
        assert acc >= 0.95, (split, acc, per_kind)
        assert min(per_kind.values()) >= 0.9, (split, per_kind)


def test_blurred_noisy_renders_still_read():
    images, _, scenes = ShapesDataset(120, 13).batch(0, 120)
    rng = np.random.default_rng(0)
    degraded = [
        np.clip(np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.8)), float)
                + rng.normal(0, 8, im.shape), 0, 255).astype(np.uint8)
        for im in images
    ]
    acc, _ = attribute_accuracy(degraded, scenes)
    assert acc >= 0.9


def test_score_penalizes_wrong_images_and_accepts_float_chw():
    images, captions, scenes = ShapesDataset(20, 14).batch(0, 20)
    two = next(i for i, s in enumerate(scenes) if len(s.objects) == 2)
    blank = np.full((64, 64, 3), 255, np.uint8)
    found, total, detail = score(captions[two], analyze(blank))
    assert found == 0 and total == 8 and set(detail) >= {"relation", "count", "obj1.shape"}
    chw = images[two].transpose(2, 0, 1).astype(np.float32) / 255.0
    found, total, _ = score(scenes[two], analyze(chw))
    assert found == total
