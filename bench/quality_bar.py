#!/usr/bin/env python3
"""The quality bar at the depth of a 1.5× SDXL plan (issue 12 §4), measured on the trained proxy model.

    PYTHONPATH=. python bench/quality_bar.py --eval-prompts 200 --out bench/results/quality-<date>/

A 1.5× UNet speed-up from slimming transformer blocks alone, when they hold a share ``s`` of the UNet's MACs,
needs the fraction ``f = (1 − 1/1.5) / s`` of the transformer-block MACs removed (ideal, MAC-bound). On SDXL at
1024² ``s`` = 0.75 (issue 12: 75 % of 3.38 TMAC per image, flop counter on its public config) → f = 0.444;
``--share`` takes another value, e.g. from ``builtin:sdxl-shape``'s MAC count. This script removes that fraction
of the proxy's compressible MACs (``SlimConfig(budget_unit="macs")``: the FFN, Q·K and V·O sites of every
transformer block, attention products included) with slimdiff's defaults, and measures against the dense model
from the same seeds:

* fidelity: PSNR / SSIM of the images;
* noise-prediction error of the slim UNet along the dense trajectory (relative L2, mean over prompts and steps);
* prompt adherence (the proxy's analyzer) and its paired difference slim − dense with its standard error.

Bar: adherence within 2 points of dense and PSNR ≥ 25 dB. Writes ``quality_bar.json``, ``quality_bar.md`` and
``grid.png`` into ``--out`` (whole or not at all).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

SDXL_TRANSFORMER_MAC_SHARE = 0.75  # issue 12: SDXL-base UNet at 1024², transformer blocks = 75 % of MACs
TARGET_SPEEDUP = 1.5
BAR_ADHERENCE_POINTS = 2.0
BAR_PSNR_DB = 25.0


def removal_fraction(speedup: float, share: float) -> float:
    """Fraction of the transformer-block MACs a MAC-bound ``speedup`` needs when they are ``share`` of the UNet."""
    fraction = (1 - 1 / speedup) / share
    if not 0 < fraction < 1:
        raise ValueError(f"a {speedup}× speed-up cannot come from {share:.0%} of the MACs alone")
    return fraction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:proxy")
    p.add_argument("--speedup", type=float, default=TARGET_SPEEDUP)
    p.add_argument("--share", type=float, default=SDXL_TRANSFORMER_MAC_SHARE,
                   help="transformer-block share of the target model's UNet MACs (default 0.75, SDXL at 1024²)")
    p.add_argument("--fraction", type=float, default=None,
                   help="remove this fraction of the compressible MACs instead of the MAC-bound depth of "
                        "--speedup: a depth a GPU measured, e.g. 0.78 (the transformer-block MACs SDXL's fastest "
                        "measured plan removes)")
    p.add_argument("--exclude", default="",
                   help="comma-separated module kinds or name fragments left dense (SlimConfig.exclude), e.g. qk,vo "
                        "for an FFN-only plan like SDXL's --speedup 1.3 plan; the fraction is then of the rest's MACs")
    p.add_argument("--r-min", type=int, default=8, help="the smallest rank a module may keep (SlimConfig.r_min)")
    p.add_argument("--fraction-source", default=None, help="where --fraction comes from (goes into the report)")
    p.add_argument("--calib-prompts", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=32, help="prompts evaluated per chunk (progress is logged per chunk)")
    p.add_argument("--deadline-min", type=float, default=None,
                   help="start no evaluation chunk after this many minutes; report the prompts done")
    p.add_argument("--stats", default=None, help="calibration statistics folder: reused when complete, else "
                                                  "written (calibration resumes there)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--range", default=None, metavar="FIRST:END",
                   help="evaluate only held-out prompts FIRST..END-1 (seeds = their indices) and save the raw "
                        "arrays to --out/part.npz: parts run in parallel processes and are joined with --merge")
    p.add_argument("--merge", nargs="+", default=None, metavar="PART",
                   help="folders written with --range that together cover prompts 0..N-1: report on their union")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ablation import _git_commit, _prompts, _weights_sha256

    from slimdiff.calibrate import CalibrationConfig, calibrate, calibration_call
    from slimdiff.errors import SlimDiffError
    from slimdiff.models import load_pipeline
    from slimdiff.quality import EvalSettings, adherence, compare, fidelity, noise_error_summary
    from slimdiff.quality.evaluate import is_proxy, paired_delta, unet_cost
    from slimdiff.quality.report import markdown_table, save_grid, write_json
    from slimdiff.serialization import atomic_output
    from slimdiff.slim import SlimConfig, check_budget, slim_unet

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    if args.fraction is not None and not 0 < args.fraction < 1:
        print(f"quality_bar: error: --fraction must lie strictly between 0 and 1, not {args.fraction}",
              file=sys.stderr)
        return 2
    fraction = removal_fraction(args.speedup, args.share) if args.fraction is None else args.fraction
    depth = (f"(1 − 1/{args.speedup}) / {args.share} = {100 * fraction:.1f} % of the compressible "
             f"(transformer-block) MACs; share: " + ("assumed 0.75 (issue 12: SDXL-base at 1024², flop counter on "
                                                     "its public config)" if args.share == SDXL_TRANSFORMER_MAC_SHARE
                                                     else "given with --share")
             if args.fraction is None else f"{100 * fraction:.1f} % of the compressible (transformer-block) MACs, "
             f"given with --fraction ({args.fraction_source or 'source not stated'})")
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"quality_bar: error: {out} exists (use --force)", file=sys.stderr)
        return 2
    commit, sha = _git_commit(), _weights_sha256(args.model)
    pipe = load_pipeline(args.model)
    proxy = is_proxy(args.model)
    guidance = 5.0 if proxy else 7.5
    calib, evals, prompt_note = _prompts(args.model, pipe, args.calib_prompts, args.eval_prompts)
    exclude = tuple(k.strip() for k in args.exclude.split(",") if k.strip())
    config = SlimConfig(budget=fraction, budget_unit="macs", exclude=exclude, r_min=args.r_min)
    calibration = CalibrationConfig(steps=args.steps, guidance_scale=guidance, seed=0, batch_size=8, pass1_prompts=16)
    try:  # a depth the model cannot give is refused before calibrating, at the calls the calibration makes
        check_budget(pipe.unet, config, call=calibration_call(pipe, calibration))
    except SlimDiffError as exc:
        print(f"quality_bar: error: {exc}", file=sys.stderr)
        return 2
    timings = {}
    t0 = time.perf_counter()
    stats = calibrate(pipe, calib, args.stats, calibration, progress=True)
    timings["calibration_s"] = round(time.perf_counter() - t0, 1)
    slim = copy.deepcopy(pipe.unet)
    rep = slim_unet(slim, stats, config, progress=False)
    dense_cost, slim_cost = unet_cost(pipe.unet), unet_cost(slim)
    t0 = time.perf_counter()
    dense_images, slim_images, noise, timesteps = [], [], [], None
    lo, hi = (int(x) for x in args.range.split(":")) if args.range else (0, len(evals))
    if args.merge:
        parts = sorted((np.load(Path(d) / "part.npz") for d in args.merge), key=lambda z: int(z["first"]))
        ranges = [(int(z["first"]), int(z["end"])) for z in parts]
        if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
            raise SystemExit(f"quality_bar: the merged parts overlap: {ranges}")
        # Held-out prompt i always has seed i, so parts that stopped at their deadline still form one paired
        # sample: the union of the prompts they reached.
        evals = [evals[i] for a, b in ranges for i in range(a, b)]
        for z in parts:
            dense_images.append(z["dense"])
            slim_images.append(z["slim"])
            noise.append(z["noise"])
            timesteps = [int(t) for t in z["timesteps"]]
        lo, hi = 0, 0  # nothing left to evaluate here
    for first in range(lo, hi, args.chunk):
        if args.deadline_min is not None and time.perf_counter() - start > 60 * args.deadline_min:
            print(f"deadline: stopping after {first} evaluation prompts", flush=True)
            break
        chunk = evals[first:min(first + args.chunk, hi)]
        # Seeds continue across chunks (prompt i always gets seed i), as one compare() over every prompt would.
        comp = compare(pipe, {"slim": slim}, chunk, EvalSettings(steps=args.steps, guidance=guidance, seed=first,
                                                                 batch_size=args.eval_batch), progress=False)
        dense_images.append(comp.dense)
        slim_images.append(comp.slims["slim"])
        noise.append(comp.noise_errors["slim"])
        timesteps = comp.timesteps
        if proxy:
            done = evals[lo:first + len(chunk)]
            d = paired_delta(adherence(np.concatenate(dense_images), done),
                             adherence(np.concatenate(slim_images), done))
            print(f"{len(done)} prompts, {time.perf_counter() - t0:.0f} s: adherence slim − dense "
                  f"{d['points']:+.2f} ± {d['stderr_points']:.2f} points", flush=True)
    timings["evaluation_s"] = round(time.perf_counter() - t0, 1)
    dense_all, slim_all = np.concatenate(dense_images), np.concatenate(slim_images)
    if args.range:
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / "part.npz", dense=dense_all, slim=slim_all, noise=np.concatenate(noise),
                            timesteps=np.asarray(timesteps), first=lo, end=lo + len(dense_all))
        print(f"prompts {lo}..{lo + len(dense_all) - 1} saved to {out / 'part.npz'}")
        return 0
    if not args.merge:
        evals = evals[:len(dense_all)]
    npe = noise_error_summary(np.concatenate(noise), timesteps)
    fid = fidelity(dense_all, slim_all)
    row = {"removed_transformer_mac_fraction":
           1 - slim_cost["macs_transformer"] / dense_cost["macs_transformer"],
           "removed_unet_mac_fraction": 1 - slim_cost["macs"] / dense_cost["macs"],
           "params_removed_fraction_of_compressible": rep.plan.params_removed / rep.plan.compressible_params,
           "removed_by_kind": rep.plan.removed_by_kind(),
           "npe": npe["mean"], "npe_first_half": npe["first_half"], "npe_second_half": npe["second_half"],
           "psnr_db": fid["psnr_db"], "ssim": fid["ssim"]}
    bar = {"psnr_mean_db": {"value": fid["psnr_db"]["mean"], "target": f">= {BAR_PSNR_DB}",
                            "met": fid["psnr_db"]["mean"] >= BAR_PSNR_DB}}
    if proxy:
        dense_a, slim_a = adherence(dense_all, evals), adherence(slim_all, evals)
        delta = paired_delta(dense_a, slim_a)
        row.update(adherence_dense=dense_a["score"], adherence_slim=slim_a["score"],
                   adherence_delta_points=delta["points"], adherence_delta_stderr=delta["stderr_points"],
                   images_better=delta["images_better"], images_worse=delta["images_worse"])
        bar["adherence_delta_points"] = {"value": delta["points"], "target": f">= -{BAR_ADHERENCE_POINTS}",
                                         "stderr": delta["stderr_points"],
                                         "met": delta["points"] >= -BAR_ADHERENCE_POINTS}
    body = {"format": "slimdiff-quality-bar/1", "model": args.model, "unet_weights_sha256": sha,
            "git_commit": commit, "target_speedup": args.speedup,
            "transformer_mac_share": args.share if args.fraction is None else None, "depth": depth,
            "budget_fraction_of_compressible_macs": fraction,
            "settings": {"exclude": list(exclude), "r_min": args.r_min, "calibration_prompts": len(calib), "steps": args.steps,
                         "guidance": guidance,
                         "eval_prompts": len(evals), "seeds": "held-out prompt i is sampled with seed i",
                         "threads": args.threads,
                         "scheduler": type(pipe.scheduler).__name__, "size": int(dense_all.shape[1]),
                         "prompts": prompt_note, "torch": torch.__version__},
            "dense": dense_cost, "slim_cost": slim_cost, "result": row, "bar": bar,
            "bar_met": all(c["met"] for c in bar.values()),
            "npe_per_step": npe["per_step"], "timesteps": timesteps,
            "evaluated_in_parts": [list(r) for r in ranges] if args.merge else None,
            "timings": {**timings, "total_s": round(time.perf_counter() - start, 1)}}
    cells = [[f"{100 * fraction:.1f}", f"{100 * row['removed_transformer_mac_fraction']:.1f}", row["npe"],
              fid["psnr_db"]["mean"], fid["ssim"]["mean"]]]
    header = ["target removal % of compressible MACs", "transformer MACs removed %", "noise-pred. error",
              "PSNR dB (mean)", "SSIM (mean)"]
    if proxy:
        header += ["adherence dense", "adherence slim", "Δ points ± paired s.e."]
        cells[0] += [row["adherence_dense"], row["adherence_slim"],
                     f"{row['adherence_delta_points']:+.2f} ± {row['adherence_delta_stderr']:.2f}"]
    title = (f"the depth of a {args.speedup}× SDXL plan" if args.fraction is None
             else f"{100 * fraction:.1f} % of the transformer-block MACs")
    md = [f"# Quality bar at {title} — `{args.model}`", "", f"Removal: {depth}.", "",
          "Settings: " + "; ".join(f"{k} = {v}" for k, v in body["settings"].items()), "",
          markdown_table(header, cells), "",
          markdown_table(["check", "measured", "target", "met"],
                         [[k, v["value"], v["target"], "yes" if v["met"] else "**no**"] for k, v in bar.items()]),
          "", f"Timings: {body['timings']}", ""]
    with atomic_output(out, args.force) as tmp:
        write_json(tmp / "quality_bar.json", body)
        (tmp / "quality_bar.md").write_text("\n".join(md), encoding="utf-8")
        save_grid(tmp / "grid.png", [("dense", dense_all[:8]), ("slim", slim_all[:8])], 8)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
