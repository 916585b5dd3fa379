"""Dense-vs-slim comparison from identical seeds: images, noise-prediction errors, adherence and costs.

:func:`compare` samples the dense pipeline once (with every slim UNet probed along its trajectory) and then
each slim pipeline; the metric helpers turn a :class:`Comparison` into report sections. Used by
``slimdiff eval`` (one slim model) and by ``bench/ablation.py`` (many).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import SlimDiffError
from ..families import family_for
from ..families.refiner import REFINER_START
from ..models import BUILTINS
from .sampling import NoiseErrorProbe, generate, with_denoiser


@dataclass(frozen=True)
class EvalSettings:
    """Sampling for evaluation; image ``i`` uses seed ``seed + i``."""

    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    size: int | None = None  # pixels; default: the model's native size
    batch_size: int = 8
    images: tuple[Path, ...] = ()  # what an image-conditioned pipeline starts from (default: its synthetic task)
    strength: float | None = None  # that pipeline's strength (default: its measuring task's)
    base: Any = None  # an SDXL base pipeline whose latents the (refiner) pipeline refines, handed over at:
    refiner_start: float = REFINER_START

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise SlimDiffError("steps and batch size must be positive")


@dataclass
class Comparison:
    prompts: list[str]
    seeds: list[int]
    timesteps: list[int]  # timestep of every UNet call of one sampling run (PNDM repeats one)
    dense: np.ndarray  # (N, H, W, 3) in [0, 1]
    slims: dict[str, np.ndarray]
    noise_errors: dict[str, np.ndarray]  # name → (N, calls)
    seconds: float


def compare(pipe, slims: dict[str, torch.nn.Module], prompts: Sequence[str], settings: EvalSettings,
            progress: bool = True) -> Comparison:
    """Sample dense and slim images from identical seeds; probe every slim denoiser along the dense trajectory."""
    start = time.perf_counter()
    prompts = list(prompts)
    if not prompts:
        raise SlimDiffError("no evaluation prompts")
    seeds = [settings.seed + i for i in range(len(prompts))]
    kw = dict(steps=settings.steps, guidance=settings.guidance, size=settings.size, batch_size=settings.batch_size,
              images=settings.images, strength=settings.strength, base=settings.base,
              refiner_start=settings.refiner_start)
    probe = NoiseErrorProbe(family_for(pipe).denoiser(pipe), slims)
    dense = generate(pipe, prompts, seeds, probe=probe, desc="dense sampling + slim noise errors" if progress else None,
                     **kw)
    images = {name: generate(with_denoiser(pipe, unet), prompts, seeds,
                             desc=f"slim sampling: {name}" if progress else None, **kw) for name, unet in slims.items()}
    return Comparison(prompts, seeds, probe.timesteps, dense, images, probe.errors(), time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------
# What the model is, and what it costs
# ----------------------------------------------------------------------------------------------------------


def is_proxy(source: str) -> bool:
    """The project's proxy model: ``builtin:proxy`` or a pipeline folder written by ``slimdiff.proxy.train``."""
    if source == "builtin:proxy":
        return True
    return not source.startswith("builtin:") and (Path(source) / "proxy_training.json").is_file()


def model_label(source: str) -> str:
    """How results of this model must be labelled in a report."""
    if is_proxy(source):
        return "proxy model (trained in-house on procedural shape scenes)"
    if source in BUILTINS:  # every built-in but the proxy (above) has seeded random weights
        return "seeded random weights (no trained model: numbers exercise the harness only)"
    return "user-supplied weights"


def unet_cost(unet: torch.nn.Module, text_tokens: int | None = None, family=None) -> dict:
    """Parameters and MACs of one denoiser call as ``family`` calls it (default the denoiser's own; FLUX Kontext's
    pipeline adds the reference image's tokens) (batch 1, native latent size, ``text_tokens``: default the family's
    text length), counted on the meta device."""
    params = sum(p.numel() for p in unet.parameters())
    try:
        from ..bench.macs import count_macs, meta_unet
    except ImportError as exc:
        return {"params": params, "macs": None, "macs_skipped": f"slimdiff.bench.macs is not importable ({exc})"}
    count = count_macs(meta_unet(unet, getattr(unet, "slim_plan", None)), text_tokens=text_tokens, family=family)
    return {"params": params, "macs": count.total, "macs_transformer": count.transformer}


# ----------------------------------------------------------------------------------------------------------
# Prompt adherence (proxy model only)
# ----------------------------------------------------------------------------------------------------------


def adherence(images: np.ndarray, prompts: Sequence[str]) -> dict:
    """Fraction of prompt attributes the proxy analyzer finds in the images (shape prompts only).

    ``found`` / ``total`` per image are kept so that two models scored on the same prompts and seeds can be
    compared image by image (:func:`paired_delta`).
    """
    from ..proxy.analyzer import analyze, score
    from ..proxy.shapes import parse_caption

    for p in prompts:
        try:
            parse_caption(p)
        except ValueError as exc:
            raise SlimDiffError(f"adherence needs shape-scene prompts of the proxy vocabulary; {p!r} is not one "
                                f"({exc})") from exc
    found, total, per_kind = [], [], {}
    for img, prompt in zip(images, prompts):
        f, t, detail = score(prompt, analyze(img))
        found.append(f)
        total.append(t)
        for k, v in detail.items():
            per_kind.setdefault(k.split(".")[-1], []).append(v)
    return {"score": sum(found) / max(sum(total), 1), "per_kind": {k: float(np.mean(v)) for k, v in per_kind.items()},
            "found": found, "total": total}


def paired_delta(dense: dict, slim: dict) -> dict:
    """Adherence difference slim − dense in points, with the standard error of the per-image paired differences."""
    if dense["total"] != slim["total"]:
        raise SlimDiffError("adherence results were not computed on the same prompts")
    t = np.asarray(dense["total"], dtype=np.float64)
    d = 100 * (np.asarray(slim["found"]) - np.asarray(dense["found"])) / t.mean()
    return {"points": 100 * (slim["score"] - dense["score"]), "stderr_points": float(d.std(ddof=1) / np.sqrt(len(d)))
            if len(d) > 1 else None, "images_better": int((d > 0).sum()), "images_worse": int((d < 0).sum())}
