"""A deterministic, procedurally generated captioned image set of simple shape scenes.

Every sample is a 64×64 RGB scene of one or two flat-colored shapes on a plain (white) or lightly tinted
background, with a caption in a closed vocabulary, e.g. ``"a small red circle left of a large blue square"`` or
``"a large green triangle"``, and its ground-truth attributes.

Splits:

* ``"train"``: every composition except the held-out ones;
* ``"heldout"``: only two-shape *compositions* never shown in training. A composition is the unordered scene
  ``(shape, color) relation (shape, color)``, made canonical so that "A right of B" is the same scene as
  "B left of A" and "A below B" the same as "B above A"; both phrasings of a held-out scene are excluded from
  training. Every shape, color, size and relation word still appears in training, only the combination is new.

Sample ``i`` of a split with seed ``s`` depends only on ``(s, i, split)``: any number of samples on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {  # saturated object colors (hue well apart); per-object jitter is added when rendering
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 215),
    "yellow": (230, 200, 30),
}
SIZES = {"small": (10, 14), "large": (20, 26)}  # side of the bounding box, pixels (inclusive range)
SIZE_THRESHOLD = 17  # analyzer: bounding-box side below this is "small"
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUNDS = {  # "plain" is white; the others are light, unsaturated tints
    "plain": (255, 255, 255),
    "gray": (222, 222, 222),
    "bluish": (222, 230, 245),
    "beige": (245, 237, 218),
    "greenish": (226, 240, 226),
    "pinkish": (245, 228, 232),
}
VOCABULARY = ("a", *SIZES, *COLORS, *SHAPES, "left", "right", "of", "above", "below")
P_SINGLE = 0.25  # fraction of one-shape scenes in the training split
N_HELDOUT = 32  # number of held-out canonical compositions (of 12 × 2 × 12 = 288)
_HELDOUT_SEED = 20240606

_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    cx: float = 0.0  # center (pixels)
    cy: float = 0.0
    side: float = 0.0  # bounding-box side (pixels)
    rgb: tuple = (0, 0, 0)

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"

    def attributes(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size}


@dataclass(frozen=True)
class Scene:
    objects: tuple  # one or two ShapeObject; with two, caption reads "objects[0] relation objects[1]"
    relation: str | None = None
    background: str = "plain"
    background_rgb: tuple = (255, 255, 255)

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            return self.objects[0].phrase()
        return f"{self.objects[0].phrase()} {self.relation} {self.objects[1].phrase()}"

    def attributes(self) -> dict:
        """Ground truth: ``{"objects": [{"shape", "color", "size"}, ...], "relation": str | None}``."""
        return {"objects": [o.attributes() for o in self.objects], "relation": self.relation}

    @property
    def composition(self):
        return composition_key(self.objects[0], self.relation, self.objects[1]) if len(self.objects) == 2 else None


def composition_key(a, relation: str, b) -> tuple:
    """Canonical ``((shape, color), "left of" | "above", (shape, color))`` of a two-shape scene."""
    pa, pb = (a.shape, a.color) if hasattr(a, "shape") else tuple(a), (b.shape, b.color) if hasattr(b, "shape") else tuple(b)
    if relation in ("right of", "below"):
        return (pb, _INVERSE[relation], pa)
    return (pa, relation, pb)


@lru_cache(maxsize=None)
def all_compositions() -> tuple:
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    return tuple((a, r, b) for a in pairs for r in ("left of", "above") for b in pairs)


@lru_cache(maxsize=None)
def heldout_compositions() -> frozenset:
    """The fixed set of canonical compositions excluded from training (same for every seed)."""
    comps = all_compositions()
    order = np.random.default_rng(_HELDOUT_SEED).permutation(len(comps))
    return frozenset(comps[i] for i in order[:N_HELDOUT])


def parse_caption(caption: str) -> dict:
    """Caption → attributes (the inverse of :attr:`Scene.caption`). Raises ``ValueError`` if malformed."""
    words = caption.strip().lower().split()

    def obj(ws):
        if len(ws) != 4 or ws[0] != "a" or ws[1] not in SIZES or ws[2] not in COLORS or ws[3] not in SHAPES:
            raise ValueError(f"not a shape phrase: {' '.join(ws)!r} in {caption!r}")
        return {"shape": ws[3], "color": ws[2], "size": ws[1]}

    if len(words) == 4:
        return {"objects": [obj(words)], "relation": None}
    for rel in RELATIONS:
        n = len(rel.split())
        if len(words) == 8 + n and " ".join(words[4:4 + n]) == rel:
            return {"objects": [obj(words[:4]), obj(words[4 + n:])], "relation": rel}
    raise ValueError(f"cannot parse caption {caption!r}")


# ------------------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------------------

_SPLIT_IDS = {"train": 0, "heldout": 1}


def _rng(seed: int, index: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), _SPLIT_IDS[split], 7])


def _place_one(rng, side):
    lo, hi = side / 2 + 2, IMAGE_SIZE - side / 2 - 2
    return rng.uniform(lo, hi), rng.uniform(lo, hi)


def _place_two(rng, sa, sb, relation):
    """Centers for A (side sa) and B (side sb) with "A relation B" unambiguous and no overlap."""
    horizontal = relation in ("left of", "right of")
    for _ in range(1000):
        (xa, ya), (xb, yb) = _place_one(rng, sa), _place_one(rng, sb)
        along_a, along_b = (xa, xb) if horizontal else (ya, yb)
        across = abs(ya - yb) if horizontal else abs(xa - xb)
        gap = abs(along_a - along_b) - (sa + sb) / 2
        if gap < 3 or across > 0.45 * abs(along_a - along_b):
            continue
        if (along_a < along_b) == (relation in ("left of", "above")):  # A is left of / above B as asked
            return (xa, ya), (xb, yb)
    return None  # rare (two large shapes, unlucky draws): the caller draws new sizes


def _make_object(rng, shape, color, size, cx=0.0, cy=0.0, side=0.0):
    base = np.array(COLORS[color])
    rgb = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, 3), 0, 255))
    return ShapeObject(shape, color, size, float(cx), float(cy), float(side), rgb)


def sample_scene(seed: int, index: int, split: str = "train", p_single: float = P_SINGLE) -> Scene:
    """Sample ``index`` of ``split`` for ``seed`` (deterministic)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; choose train or heldout")
    rng = _rng(seed, index, split)
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    bg = tuple(int(v) for v in np.clip(np.array(BACKGROUNDS[bg_name]) + rng.integers(-4, 5, 3), 0, 255))
    sizes = list(SIZES)

    def side(size):
        lo, hi = SIZES[size]
        return float(rng.integers(lo, hi + 1))

    if split == "train" and rng.random() < p_single:
        shape, color, size = SHAPES[rng.integers(3)], list(COLORS)[rng.integers(4)], sizes[rng.integers(2)]
        s = side(size)
        cx, cy = _place_one(rng, s)
        return Scene((_make_object(rng, shape, color, size, cx, cy, s),), None, bg_name, bg)

    held = heldout_compositions()
    if split == "train":
        while True:
            pa = (SHAPES[rng.integers(3)], list(COLORS)[rng.integers(4)])
            pb = (SHAPES[rng.integers(3)], list(COLORS)[rng.integers(4)])
            rel = RELATIONS[rng.integers(4)]
            if composition_key(pa, rel, pb) not in held:
                break
    else:
        comps = sorted(held)
        pa, canon_rel, pb = comps[rng.integers(len(comps))]
        if rng.random() < 0.5:  # either phrasing of the held-out scene
            pa, pb, rel = pb, pa, _INVERSE[canon_rel]
        else:
            rel = canon_rel
    placed = None
    while placed is None:  # the first draw places almost every scene; redrawing keeps earlier scenes as they were
        za, zb = sizes[rng.integers(2)], sizes[rng.integers(2)]
        sa, sb = side(za), side(zb)
        placed = _place_two(rng, sa, sb, rel)
    (xa, ya), (xb, yb) = placed
    a = _make_object(rng, *pa, za, xa, ya, sa)
    b = _make_object(rng, *pb, zb, xb, yb, sb)
    return Scene((a, b), rel, bg_name, bg)


def render(scene: Scene) -> np.ndarray:
    """Render a scene as a ``(64, 64, 3)`` uint8 array (no anti-aliasing)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background_rgb)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        h = o.side / 2
        x0, y0, x1, y1 = o.cx - h, o.cy - h, o.cx + h - 1, o.cy + h - 1
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=o.rgb)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=o.rgb)
        elif o.shape == "triangle":  # isosceles, pointing up, base = height = side
            draw.polygon([(o.cx - 0.5, y0), (x1, y1), (x0, y1)], fill=o.rgb)
        else:  # pragma: no cover
            raise ValueError(o.shape)
    return np.asarray(img, dtype=np.uint8).copy()


@dataclass
class ShapesDataset:
    """``n`` samples of ``split`` for ``seed``; ``ds[i] -> (image uint8 HWC, caption, Scene)``."""

    n: int
    seed: int = 0
    split: str = "train"
    p_single: float = P_SINGLE
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return sample_scene(self.seed, i, self.split, self.p_single)

    def __getitem__(self, i: int):
        s = self.scene(i)
        return render(s), s.caption, s

    def batch(self, start: int, count: int):
        """Images ``(count, 64, 64, 3)`` uint8, captions, scenes for indices ``start .. start+count-1``."""
        scenes = [self.scene(i) for i in range(start, start + count)]
        return np.stack([render(s) for s in scenes]), [s.caption for s in scenes], scenes


# ------------------------------------------------------------------------------------------------------------
# Horizontal-flip augmentation
# ------------------------------------------------------------------------------------------------------------

_HFLIP = {"left of": "right of", "right of": "left of"}


def flip_scene(scene: Scene) -> Scene:
    """The scene mirrored left-right, i.e. what ``render(scene)[:, ::-1]`` shows (to within a pixel of PIL's
    rasterisation of fractional centres).

    Centres move to ``x → 64 − x`` (a box over pixels ``cx − h .. cx + h − 1`` lands on the same span of the
    mirrored image); "left of" ↔ "right of"; "above" / "below" are unchanged. Every shape is left-right symmetric
    (the triangle's apex sits over the middle of its base), so shape, colour and size are unchanged.
    """
    objs = tuple(replace(o, cx=float(IMAGE_SIZE - o.cx)) for o in scene.objects)
    return Scene(objs, _HFLIP.get(scene.relation, scene.relation), scene.background, scene.background_rgb)


@lru_cache(maxsize=None)
def flip_caption(caption: str) -> str:
    """Caption of the mirrored scene: "left of" ↔ "right of" (one-object and vertical captions unchanged)."""
    a = parse_caption(caption)
    if a["relation"] not in _HFLIP:
        return caption
    left, _, right = caption.partition(f" {a['relation']} ")
    return f"{left} {_HFLIP[a['relation']]} {right}"


def flip_allowed(scene: Scene) -> bool:
    """True when the mirrored scene may be used for training: its composition is not a held-out one.

    Mirroring "A left of B" gives "A right of B", the composition "B left of A", which may be held out even
    though "A left of B" is not; those mirrors are dropped so that no held-out composition reaches training.
    """
    return len(scene.objects) == 1 or flip_scene(scene).composition not in heldout_compositions()


# ------------------------------------------------------------------------------------------------------------
# Bulk rendering (multiprocessing)
# ------------------------------------------------------------------------------------------------------------


def render_range(job) -> tuple:
    """``job = (seed, start, count, split, p_single)`` → ``(images (count, 64, 64, 3) uint8, captions,
    flip_ok (count,) bool)``. A top-level function so that a process pool can run it."""
    seed, start, count, split, p_single = job
    scenes = [sample_scene(seed, i, split, p_single) for i in range(start, start + count)]
    imgs = np.stack([render(s) for s in scenes])
    return imgs, [s.caption for s in scenes], np.array([flip_allowed(s) for s in scenes], dtype=bool)


def render_jobs(n: int, seed: int = 0, split: str = "train", p_single: float = P_SINGLE, chunk: int = 2048):
    return [(seed, s, min(chunk, n - s), split, p_single) for s in range(0, n, chunk)]


def concat_rendered(parts) -> tuple:
    parts = list(parts)
    return (np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]],
            np.concatenate([p[2] for p in parts]))


def render_parallel(n: int, seed: int = 0, split: str = "train", p_single: float = P_SINGLE,
                    processes: int | None = None, chunk: int = 2048) -> tuple:
    """Samples ``0 .. n-1`` of ``split`` rendered by a fork-based process pool (identical to a serial render).

    Returns ``(images (n, 64, 64, 3) uint8, captions, flip_ok (n,) bool)``.
    """
    import multiprocessing as mp
    import os

    jobs = render_jobs(n, seed, split, p_single, chunk)
    processes = processes or max(1, (os.cpu_count() or 1) - 1)
    if processes <= 1 or len(jobs) <= 1:
        return concat_rendered(map(render_range, jobs))
    with mp.get_context("fork").Pool(min(processes, len(jobs))) as pool:
        return concat_rendered(pool.map(render_range, jobs))


def train_captions(n_scenes: int = 2000, seed: int = 777) -> list[str]:
    """Distinct captions of the first ``n_scenes`` training scenes (never a held-out composition): the proxy's
    own calibration pool — its closed vocabulary cannot read COCO captions."""
    ds = ShapesDataset(n_scenes, seed=seed, split="train")
    return list(dict.fromkeys(ds.scene(i).caption for i in range(len(ds))))


def heldout_prompts(n: int = 64, seed: int = 0) -> list[str]:
    """``n`` captions of held-out compositions (random sizes and phrasing), deterministic in ``seed``."""
    return [sample_scene(seed, i, "heldout").caption for i in range(n)]
