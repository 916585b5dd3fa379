"""Does the softmax allocation lose because TRQ scores of different module kinds are not on one scale?

    python bench/allocation_check.py [--model builtin:proxy] [--budget 0.4] [--out FILE.md]

The bilinear query–key TRQ is a product of two gains and lands around 3–20 on the proxy, while FFN and VO TRQs
sit near 1–2.5; min–max normalising them together makes every QK module look important. This check allocates the
same budget with the module scores min–max normalised *within each kind* (ffn / qk / vo) and compares the
noise-prediction error with the scores as designed and with uniform allocation. Same calibration and evaluation
prompts as ``bench/ablation.py`` (TRQ statistics only).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import replace

import numpy as np
import torch

from ablation import TARGET_BUDGET, _prompts  # noqa: E402  (bench/ is the script's own directory)
from slimdiff import allocate as alloc
from slimdiff.calibrate import CalibrationConfig, calibrate
from slimdiff.models import load_pipeline
from slimdiff.quality import EvalSettings, compare
from slimdiff.quality.evaluate import is_proxy, model_label
from slimdiff.quality.report import markdown_table
from slimdiff.slim import SlimConfig, allocation_items, apply_ranks


def per_kind(items: list[alloc.AllocationItem], kinds: dict[str, str]) -> list[alloc.AllocationItem]:
    """The same items with scores min–max normalised within each module kind."""
    out = []
    for kind in sorted(set(kinds.values())):
        group = [it for it in items if kinds[it.name] == kind]
        lo, hi = min(it.score for it in group), max(it.score for it in group)
        out += [replace(it, score=(it.score - lo) / (hi - lo) if hi > lo else 0.0) for it in group]
    order = {it.name: i for i, it in enumerate(items)}
    return sorted(out, key=lambda it: order[it.name])


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:proxy")
    ap.add_argument("--budget", type=float, default=TARGET_BUDGET)
    ap.add_argument("--calib-prompts", type=int, default=64)
    ap.add_argument("--pass1-prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    guidance = args.guidance if args.guidance is not None else (5.0 if is_proxy(args.model) else 7.5)
    calib, evals, note = _prompts(args.model, pipe, args.calib_prompts, args.eval_prompts)
    stats = calibrate(pipe, calib, None, CalibrationConfig(steps=args.steps, guidance_scale=guidance, batch_size=8,
                                                           pass1_prompts=args.pass1_prompts), progress=False)
    config = SlimConfig(budget=args.budget)
    items, analyses = allocation_items(pipe.unet, stats, config, progress=False)
    kinds = {name: a.site.kind for name, a in analyses.items()}
    budget = args.budget * sum(it.unit_cost * it.width for it in items)
    plans = {
        "scores as designed (global min-max)": alloc.allocate(items, budget, temperature=config.temperature),
        "scores min-max within each kind": alloc.allocate(per_kind(items, kinds), budget,
                                                           temperature=config.temperature),
        "uniform (temperature ∞)": alloc.allocate(items, budget, temperature=float("inf")),
    }
    models = {}
    for name, ranks in plans.items():
        models[name] = copy.deepcopy(pipe.unet)
        apply_ranks(models[name], stats, ranks, config, analyses=analyses, progress=False)
    comp = compare(pipe, models, evals, EvalSettings(steps=args.steps, guidance=guidance), progress=False)
    rows = []
    for name, ranks in plans.items():
        removed = {k: sum(it.unit_cost * (it.width - ranks[it.name]) for it in items if kinds[it.name] == k)
                   for k in ("ffn", "qk", "vo")}
        rows.append([name, float(np.mean(comp.noise_errors[name])), *[int(v) for v in removed.values()]])
    text = "\n".join([
        f"Allocation check on `{args.model}` ({model_label(args.model)}), budget {args.budget} of compressible "
        f"parameters, softmax temperature {config.temperature}; {note}; {args.steps} steps, guidance {guidance}.", "",
        markdown_table(["allocation", "noise-pred. error (mean)", "removed ffn", "removed qk", "removed vo"], rows),
        ""])
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
