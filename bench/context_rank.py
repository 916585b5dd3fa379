"""Effective rank of the inputs each attention sees on a model's own trajectories (evidence for the ablation note).

    python bench/context_rank.py [--model slimdiff/assets/proxy] [--prompts 16] [--steps 10]

For every transformer block: the width of the self-attention input and of the text context that feeds the
cross-attention keys/values, and how many eigen-directions of their second moments hold 99 % / 99.9 % of the
energy. A context of low effective rank is why cross-attention can lose rank almost for free.
"""

from __future__ import annotations

import argparse

import torch

from slimdiff.calibrate import CalibrationConfig, calibrate
from slimdiff.families import QK, module_sites
from slimdiff.models import load_pipeline
from slimdiff.proxy import PROXY_DIR
from slimdiff.proxy.shapes import ShapesDataset


def effective_rank(moment: torch.Tensor, energy: float) -> int:
    eig = torch.linalg.eigvalsh(moment).flip(0).clamp_min(0)
    return int((eig.cumsum(0) / eig.sum() < energy).sum()) + 1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(PROXY_DIR))
    ap.add_argument("--prompts", type=int, default=16, help="train-split shape captions (seed 777)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=5.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    ds = ShapesDataset(args.prompts, seed=777, split="train")
    # uniform weighting: the Q·K input moment of a self-attention is then its input pooled over all timesteps
    config = CalibrationConfig(steps=args.steps, guidance_scale=args.guidance, pass1_prompts=4, batch_size=8,
                               weighting="uniform")
    stats = calibrate(pipe, [ds.scene(i).caption for i in range(args.prompts)], None, config, progress=False)
    print(f"{'block':<45} {'input':>6} {'width':>6} {'rank99%':>8} {'rank99.9%':>10}")
    for site in sorted((s for s in module_sites(pipe.unet) if s.kind == QK), key=lambda s: s.sublayer_path):
        attn = stats.attention(site.sublayer_path)
        moment, name = (attn.qk_input_moment, "self") if attn.context is None else (attn.context_moment, "text")
        print(f"{site.block:<45} {name:>6} {moment.shape[0]:>6} {effective_rank(moment, 0.99):>8} "
              f"{effective_rank(moment, 0.999):>10}")


if __name__ == "__main__":
    main()
