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


def save_grid(path, images, cols: int = 8) -> None:
    """PNG grid of HWC float images in [0, 1]."""
    from PIL import Image

    n = len(images)
    rows = max(1, -(-n // cols))
    h, w = images[0].shape[:2]
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 128, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = (
            np.clip(im, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)


def main(argv=None) -> int:
    """``python -m slimdiff.proxy.evaluate [--model FOLDER] [--split heldout|train] [--n 64] [--seeds 0 1]``."""
    import argparse
    import json

    from diffusers import StableDiffusionPipeline

    from . import PROXY_DIR
    from .shapes import ShapesDataset, heldout_prompts

    ap = argparse.ArgumentParser(prog="python -m slimdiff.proxy.evaluate")
    ap.add_argument("--model", default=str(PROXY_DIR))
    ap.add_argument("--split", choices=("heldout", "train"), default="heldout")
    ap.add_argument("--n", type=int, default=64, help="number of prompts")
    ap.add_argument("--prompt-seed", type=int, default=12345)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", default=None, help="write a PNG grid of the images here")
    ap.add_argument("--json", default=None, help="write the report (with per-image records) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if args.split == "heldout":
        prompts = heldout_prompts(args.n, seed=args.prompt_seed)
    else:
        prompts = [ShapesDataset(args.n, seed=args.prompt_seed).scene(i).caption for i in range(args.n)]
    rep = adherence(pipe, prompts, args.seeds, steps=args.steps, guidance=args.guidance,
                    keep_images=bool(args.grid))
    print(json.dumps({"split": args.split, "prompts": len(prompts), "seeds": args.seeds, "steps": args.steps,
                      "guidance": args.guidance, "adherence": rep.score, "per_kind": rep.per_kind}, indent=2))
    if args.grid:
        save_grid(args.grid, rep.images)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"adherence": rep.score, "per_kind": rep.per_kind, "records": rep.records}, f, indent=1)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
