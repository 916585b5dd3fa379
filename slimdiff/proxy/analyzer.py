"""Classical-vision reader for shape scenes: what shapes, of which color and size, where.

``analyze(image)`` estimates the background from the image border, keeps saturated pixels that differ from
it, classifies each by hue into the palette colors, finds connected components per color, and describes each
component by its bounding box (size), fill ratio and vertical mass balance (shape: a square fills its box, a
circle about π/4 of it, an upward triangle about half, with three quarters of its mass in the lower half).

``score(expected, analysis)`` counts how many prompt attributes the image shows: per prompt object its shape,
color and size, the relation between the two objects, and the number of objects. Objects are matched to the
prompt by the assignment that finds the most attributes. ``adherence`` over many images is found / total.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np

from .shapes import COLORS, SIZE_THRESHOLD, parse_caption

MIN_SATURATION = 0.35
MIN_BG_DISTANCE = 0.18  # RGB distance to the background, in [0, sqrt(3)]
MIN_AREA = 12  # pixels
MIN_REL_AREA = 0.04  # of the largest component
SQUARE_FILL = 0.88
TRIANGLE_BOTTOM = 0.62


@dataclass(frozen=True)
class Detected:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    side: int
    area: int
    fill: float
    bottom: float

    def attributes(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size}


@dataclass(frozen=True)
class Analysis:
    objects: tuple  # Detected, largest first
    background: tuple  # RGB in [0, 1]

    def relation(self, i: int, j: int) -> str:
        """Relation of object ``i`` to object ``j`` ("left of", "right of", "above", "below")."""
        return relation_between(self.objects[i], self.objects[j])

    def summary(self) -> str:
        parts = [f"{o.size} {o.color} {o.shape}@({o.cx:.0f},{o.cy:.0f})" for o in self.objects]
        return ", ".join(parts) if parts else "(nothing)"


def relation_between(a, b) -> str:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of ``(..., 3)`` RGB in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx - mn > 1e-6, mx - mn, 1.0)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


_COLOR_NAMES = list(COLORS)
_PALETTE_HUES = _hue(np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float64) / 255.0)


def _to_array(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:  # CHW
        a = a.transpose(1, 2, 0)
    a = a[..., :3]
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    return np.clip(a, 0.0, 1.0)


def _components(classes: np.ndarray):
    """8-connected components of equal non-negative class; yields ``(class, ys, xs)``."""
    h, w = classes.shape
    seen = classes < 0
    seen = seen.copy()
    for y0 in range(h):
        for x0 in range(w):
            if seen[y0, x0]:
                continue
            c = classes[y0, x0]
            stack, ys, xs = [(y0, x0)], [], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                ys.append(y)
                xs.append(x)
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and classes[ny, nx] == c:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            yield int(c), np.array(ys), np.array(xs)


def _describe(color: str, ys: np.ndarray, xs: np.ndarray) -> Detected:
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    hgt, wid = y1 - y0 + 1, x1 - x0 + 1
    area = len(ys)
    fill = area / float(hgt * wid)
    mid = (y0 + y1) / 2.0
    bottom = (np.sum(ys > mid) + 0.5 * np.sum(ys == mid)) / area
    if bottom >= TRIANGLE_BOTTOM or fill < 0.6:
        shape = "triangle"
    elif fill >= SQUARE_FILL:
        shape = "square"
    else:
        shape = "circle"
    side = int(max(hgt, wid))
    size = "small" if side < SIZE_THRESHOLD else "large"
    return Detected(shape, color, size, float((x0 + x1) / 2), float((y0 + y1) / 2), side, area, float(fill),
                    float(bottom))


def analyze(image) -> Analysis:
    """Read one image (HWC uint8 / float in [0, 1], PIL image, or CHW) into its shapes."""
    img = _to_array(image)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    mx, mn = img.max(-1), img.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    fg = (sat >= MIN_SATURATION) & (np.linalg.norm(img - bg, axis=-1) >= MIN_BG_DISTANCE)
    hue = _hue(img)
    dist = np.abs(hue[..., None] - _PALETTE_HUES)
    dist = np.minimum(dist, 360.0 - dist)
    classes = np.where(fg, dist.argmin(-1), -1)
    comps = [(c, ys, xs) for c, ys, xs in _components(classes) if len(ys) >= MIN_AREA]
    if comps:
        biggest = max(len(ys) for _, ys, _ in comps)
        comps = [t for t in comps if len(t[1]) >= MIN_REL_AREA * biggest]
    objs = sorted((_describe(_COLOR_NAMES[c], ys, xs) for c, ys, xs in comps), key=lambda o: -o.area)
    return Analysis(tuple(objs), tuple(float(v) for v in bg))


def _as_expected(expected) -> dict:
    if isinstance(expected, str):
        return parse_caption(expected)
    if hasattr(expected, "attributes"):
        return expected.attributes()
    return expected


def score(expected, analysis: Analysis, max_candidates: int = 4) -> tuple[int, int, dict]:
    """``(found, total, detail)``: prompt attributes found in the analysed image.

    ``expected`` is a caption, a :class:`~slimdiff.proxy.shapes.Scene` or its ``attributes()`` dict. Attributes:
    shape, color and size of each prompt object, the relation (two-object prompts) and the object count.
    ``detail`` maps attribute names (``obj0.shape``, ..., ``relation``, ``count``) to 0/1.
    """
    exp = _as_expected(expected)
    want = exp["objects"]
    dets = list(analysis.objects[:max_candidates])
    names = [f"obj{k}.{a}" for k in range(len(want)) for a in ("shape", "color", "size")]
    if len(want) == 2:
        names.append("relation")
    best = None
    for perm in permutations(range(len(dets)), min(len(want), len(dets))):
        d = {}
        for k, w in enumerate(want):
            for a in ("shape", "color", "size"):
                d[f"obj{k}.{a}"] = int(k < len(perm) and getattr(dets[perm[k]], a) == w[a])
        if len(want) == 2:
            d["relation"] = int(len(perm) == 2 and relation_between(dets[perm[0]], dets[perm[1]]) == exp["relation"])
        if best is None or sum(d.values()) > sum(best.values()):
            best = d
    if best is None:
        best = {n: 0 for n in names}
    best["count"] = int(len(analysis.objects) == len(want))
    return sum(best.values()), len(best), best


def attribute_accuracy(images, expected) -> tuple[float, dict]:
    """Mean fraction of attributes found over images, and per-attribute-kind accuracy."""
    found = total = 0
    per: dict[str, list[int]] = {}
    for img, exp in zip(images, expected):
        f, t, d = score(exp, analyze(img))
        found, total = found + f, total + t
        for k, v in d.items():
            per.setdefault(k.split(".")[-1], []).append(v)
    return found / max(total, 1), {k: float(np.mean(v)) for k, v in per.items()}
