"""The procedural shape-scene data set: determinism, captions, held-out split."""

import numpy as np
import pytest

from slimdiff.proxy import shapes
from slimdiff.proxy.shapes import ShapesDataset, composition_key, heldout_compositions, parse_caption, sample_scene


def test_deterministic_and_seeded():
    a, ca, _ = ShapesDataset(8, seed=3).batch(0, 8)
    b, cb, _ = ShapesDataset(8, seed=3).batch(0, 8)
    c, cc, _ = ShapesDataset(8, seed=4).batch(0, 8)
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c)
    # sample i does not depend on how many samples were asked for
    big, cbig, _ = ShapesDataset(100, seed=3).batch(0, 8)
    assert np.array_equal(big, a) and cbig == ca


def test_captions_parse_back_and_use_closed_vocabulary():
    ds = ShapesDataset(300, seed=0)
    n_single = 0
    for i in range(len(ds)):
        s = ds.scene(i)
        assert parse_caption(s.caption) == s.attributes()
        assert set(s.caption.split()) <= set(shapes.VOCABULARY)
        n_single += len(s.objects) == 1
    assert 30 < n_single < 120  # about a quarter single-shape scenes
    with pytest.raises(ValueError):
        parse_caption("a purple circle")


def test_geometry_matches_relation_and_stays_inside():
    for split in ("train", "heldout"):
        for i in range(200):
            s = sample_scene(5, i, split)
            for o in s.objects:
                assert o.side / 2 <= o.cx <= 64 - o.side / 2 and o.side / 2 <= o.cy <= 64 - o.side / 2
                lo, hi = shapes.SIZES[o.size]
                assert lo <= o.side <= hi
            if len(s.objects) == 2:
                a, b = s.objects
                dx, dy = a.cx - b.cx, a.cy - b.cy
                rel = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
                assert rel == s.relation


def test_heldout_compositions_never_in_training_but_attributes_are():
    held = heldout_compositions()
    assert len(held) == shapes.N_HELDOUT
    seen_words = set()
    for i in range(3000):
        s = sample_scene(0, i, "train")
        seen_words |= set(s.caption.split())
        if len(s.objects) == 2:
            assert s.composition not in held
    assert seen_words == set(shapes.VOCABULARY)
    phrasings = set()
    for i in range(300):
        s = sample_scene(0, i, "heldout")
        assert len(s.objects) == 2 and s.composition in held
        phrasings.add(s.relation)
    assert phrasings == set(shapes.RELATIONS)
    # both phrasings of one scene share a composition key
    assert composition_key(("circle", "red"), "right of", ("square", "blue")) == composition_key(
        ("square", "blue"), "left of", ("circle", "red"))
