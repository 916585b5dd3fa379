"""Prompt adherence of a text-to-image pipeline on shape prompts, read by :mod:`.analyzer`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .analyzer import analyze, score


@dataclass
class AdherenceReport:
    score: float  # attributes found / attributes asked, over all images
    per_kind: dict  # shape / color / size / relation / count → accuracy
    records: list = field(default_factory=list)  # per image: prompt, seed, found, total, detected summary
    images: list = field(default_factory=list)  # HWC float arrays in [0, 1] (when keep_images)

    def __float__(self) -> float:
        return float(self.score)


@torch.no_grad()
def generate(pipe, prompts, seeds, steps: int = 25, guidance: float = 5.0, batch_size: int = 16,
             size: int = 64) -> list[tuple[str, int, np.ndarray]]:
    """``(prompt, seed, image)`` for every prompt × seed; image is HWC float in [0, 1]."""
    jobs = [(p, int(s)) for p in prompts for s in seeds]
    device = getattr(pipe, "device", torch.device("cpu"))
    out = []
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k:k + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        latents = torch.stack([
            torch.randn((pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor),
                        generator=g) for g in gens
        ]).to(device=device, dtype=pipe.unet.dtype)
        res = pipe([p for p, _ in chunk], height=size, width=size, num_inference_steps=steps,
                   guidance_scale=guidance, latents=latents, output_type="np")
        out.extend((p, s, img) for (p, s), img in zip(chunk, res.images))
    return out


def adherence(pipe, prompts, seeds=(0,), steps: int = 25, guidance: float = 5.0, batch_size: int = 16,
              keep_images: bool = False) -> AdherenceReport:
    """Generate every prompt × seed at 64×64 and score the images with the analyzer.

    Initial latents come from per-seed CPU generators, so results do not depend on batching or device.
    """
    found = total = 0
    per: dict = {}
    rep = AdherenceReport(0.0, {})
    for prompt, seed, img in generate(pipe, prompts, seeds, steps, guidance, batch_size):
        a = analyze(img)
        f, t, detail = score(prompt, a)
        found, total = found + f, total + t
        for k, v in detail.items():
            per.setdefault(k.split(".")[-1], []).append(v)
        rep.records.append({"prompt": prompt, "seed": seed, "found": f, "total": t, "detected": a.summary()})
        if keep_images:
            rep.images.append(img)
    rep.score = found / max(total, 1)
    rep.per_kind = {k: float(np.mean(v)) for k, v in per.items()}
    return rep
