#!/usr/bin/env python3
"""Slimming stacked with DeepCache's feature caching: what each buys alone and together, on the trained proxy.

    PYTHONPATH=. python bench/deepcache_composition.py --out bench/results/<date>-cpu-deepcache/

Users ask that a compressed model compose with caching (peers.md, user ask 6; DeepCache is baseline 6). DeepCache
(the ``DeepCache`` package's ``DeepCacheSDHelper``, ``pip install 'slimdiff[bench]'``) recomputes the UNet's deep
branches every ``--interval`` steps and reuses them in between; with ``cache_branch_id`` 0 only the outermost down
and up layers run on a cached step. Slimming narrows the transformer blocks, which are mostly in the deep branches:
on cached steps there is little left for it to save, so the two do not simply multiply — this script measures by
how much.

**Measured, on the trained proxy** (``--model``): dense, slim (``--budget`` of the compressible parameters, slimdiff's
defaults, calibrated on the dense model), and each with DeepCache at every ``--intervals`` value, sampling the same
held-out prompts from the same seeds. Fidelity: PSNR / SSIM against the dense images, and of slim + DeepCache against
dense + DeepCache (what slimming adds to the cache's error). Speed: one image (batch 1, classifier-free guidance: UNet
batch 2) from prompt to pixels, each variant timed interleaved with dense in one process (pairs alternating AB/BA),
the speed-up being the median of per-pair ratios with a bootstrap interval (``slimdiff.bench.timing``), marked noisy
when that interval is wide or the machine was busy. The proxy is small: its CPU time is mostly per-module overhead,
not arithmetic, so these speed-ups say what caching skips, not what slimming would gain on a real model.

**Ideal, at real shapes** (``--ideal-models``: SD-1.5 at 512², SDXL at 1024², meta device, no weights): the MACs of a
full UNet call and of a cached one — DeepCache's own wrappers run on a weightless UNet, one step filling the cache and
the next reusing it — for the dense UNet and for plans removing ``--ideal-fractions`` of the transformer-block MACs;
over ``--ideal-steps`` steps (a full call every ``interval``-th step), the MAC ratios dense / variant: what a
compute-bound engine could gain from each alone and from both.

Writes ``deepcache_composition.json`` and ``.md`` into ``--out`` (whole or not at all).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from composition import DENSE, SLIM, add_slimming_arguments, dense_and_slim, fidelity_to_dense  # noqa: E402

IDEAL_LATENTS = {"builtin:sd15-shape": (64, 64), "builtin:sdxl-shape": (128, 128)}  # 512² and 1024² images


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slimming_arguments(p, threads=1)  # 1 thread: the timing least hit by other work
    p.add_argument("--intervals", default="2,3", help="DeepCache cache_interval values: a full UNet every N steps")
    p.add_argument("--branch", type=int, default=0, help="DeepCache's cache_branch_id (0: the shallowest)")
    p.add_argument("--pairs", type=int, default=20, help="timed dense/variant pairs per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ideal-models", default=",".join(IDEAL_LATENTS))
    p.add_argument("--ideal-fractions", default="0.4,0.6", help="fractions of the transformer-block MACs removed")
    p.add_argument("--ideal-steps", type=int, default=50)
    args = p.parse_args(argv)
    intervals = [int(k) for k in args.intervals.split(",")]
    unknown = [m for m in args.ideal_models.split(",") if m and m not in IDEAL_LATENTS]
    if min(intervals) < 2 or unknown:
        p.error(f"intervals must be ≥ 2 and ideal models among {', '.join(IDEAL_LATENTS)}")
    return args


def deepcache(unet, pipe, interval: int, branch: int):
    """Wrap ``unet`` (its and its blocks' ``forward``, in place) with DeepCache for ``pipe``, whose scheduler's
    timesteps tell DeepCache which step a call is."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return helper


def with_deepcache(pipe, interval: int, branch: int):
    """``pipe`` with a copy of its UNet wrapped by DeepCache."""
    pipe.unet = copy.deepcopy(pipe.unet)
    deepcache(pipe.unet, pipe, interval, branch)
    return pipe


def deepcache_step_macs(unet, branch: int, latent: tuple[int, int], batch: int = 2) -> tuple[int, int]:
    """``(MACs of a full call, MACs of a cached call)`` of a weightless ``unet`` (meta device) under DeepCache: its
    own wrappers decide what runs — the first step fills the cache, the second reuses it."""
    from types import SimpleNamespace

    from slimdiff.bench.macs import call_macs
    from slimdiff.families import family_for

    call = family_for(unet).dummy_call(unet.config, batch, latent, device="meta")
    sample = call.pop("sample")
    del call["timestep"]
    steps = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=[999, 979]))
    helper = deepcache(unet, steps, interval=2, branch=branch)
    try:
        # DeepCache reads the step from the timestep's value: a host tensor (the UNet moves it to the meta device)
        return tuple(call_macs(lambda t=t: unet(sample, torch.tensor(t), **call)) for t in steps.scheduler.timesteps)
    finally:
        helper.disable()


def ideal_rows(models: list[str], fractions: list[float], intervals: list[int], steps: int, branch: int) -> list[dict]:
    """MAC-ratio speed-ups of slimming, DeepCache and both, per model, plan and interval (see the module text)."""
    from slimdiff.bench.macs import meta_unet
    from slimdiff.bench.plans import transformer_mac_plan
    from slimdiff.models import BUILTIN_DENOISER_CONFIGS

    rows = []
    for model in models:
        latent = IDEAL_LATENTS[model]
        dense_unet = meta_unet(BUILTIN_DENOISER_CONFIGS[model])
        dense_full, dense_cached = deepcache_step_macs(dense_unet, branch, latent)
        for fraction in fractions:
            plan = transformer_mac_plan(dense_unet, fraction, latent)
            slim_full, slim_cached = deepcache_step_macs(meta_unet(BUILTIN_DENOISER_CONFIGS[model], plan), branch,
                                                         latent)
            for interval in intervals:
                full = -(-steps // interval)  # steps whose index is a multiple of the interval
                cached = steps - full
                dense_run = steps * dense_full
                rows.append({
                    "model": model, "image_px": latent[0] * 8, "fraction_of_transformer_macs_removed": fraction,
                    "interval": interval, "steps": steps, "full_steps": full,
                    "dense_gmac_per_call": {"full": dense_full / 1e9, "cached": dense_cached / 1e9},
                    "slim_gmac_per_call": {"full": slim_full / 1e9, "cached": slim_cached / 1e9},
                    "slimming_saves_on_a_cached_call": 1 - slim_cached / dense_cached,
                    "ideal_speedup": {
                        SLIM: dense_full / slim_full,
                        f"{DENSE} + DeepCache": dense_run / (full * dense_full + cached * dense_cached),
                        f"{SLIM} + DeepCache": dense_run / (full * slim_full + cached * slim_cached)}})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import DeepCache  # noqa: F401  (before any slow work)
    except ImportError:
        print("this benchmark needs the DeepCache package: pip install 'slimdiff[bench]'", file=sys.stderr)
        return 2
    from ablation import _git_commit, _weights_sha256

    from slimdiff.bench.timing import judge_speedup, load_average, speedup_interval, time_interleaved
    from slimdiff.quality.evaluate import is_proxy
    from slimdiff.quality.report import write_json
    from slimdiff.quality.sampling import generate
    from slimdiff.serialization import atomic_output_dir, commit_output_dir

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    intervals = [int(k) for k in args.intervals.split(",")]
    out = Path(args.out)
    tmp = atomic_output_dir(out, overwrite=args.force)
    try:
        ideal = ideal_rows([m for m in args.ideal_models.split(",") if m], _floats(args.ideal_fractions), intervals,
                           args.ideal_steps, args.branch)
        print(f"ideal MAC ratios counted in {time.perf_counter() - start:.0f} s", flush=True)
        t0 = time.perf_counter()
        models = dense_and_slim(args)
        print(f"calibrated and slimmed in {time.perf_counter() - t0:.0f} s", flush=True)
        dense, guidance, evals = models.dense, models.guidance, models.evals
        pipes = {DENSE: dense, SLIM: models.pipeline(models.slim_unet)}
        for k in intervals:
            pipes[f"{DENSE} + DeepCache {k}"] = with_deepcache(models.pipeline(dense.unet), k, args.branch)
            pipes[f"{SLIM} + DeepCache {k}"] = with_deepcache(models.pipeline(models.slim_unet), k, args.branch)
        parameters = {name: sum(p.numel() for p in pipe.unet.parameters()) for name, pipe in pipes.items()}

        seeds = list(range(len(evals)))
        images = {name: generate(pipe, evals, seeds, steps=args.steps, guidance=guidance, batch_size=16)
                  for name, pipe in pipes.items()}

        variants = {}
        for name in pipes:
            if name == DENSE:
                continue
            variants[name] = {**fidelity_to_dense(images, name), "unet_parameters": parameters[name]}
            psnr = variants[name]["psnr_db"]
            print(f"{name}: {psnr['mean']:.2f} ± {psnr['stderr']:.2f} dB vs dense", flush=True)

        def one_image(pipe):
            return lambda: pipe(evals[0], num_inference_steps=args.steps, guidance_scale=guidance,
                                generator=torch.Generator().manual_seed(0), output_type="np")

        loads = [load_average()]
        for name in variants:
            dense_ms, variant_ms = time_interleaved(one_image(dense), one_image(pipes[name]), "cpu",
                                                    warmup=args.warmup, pairs=args.pairs)
            loads.append(load_average())
            interval = speedup_interval(dense_ms, variant_ms)
            seen = [x for x in loads if x is not None]
            noisy = judge_speedup(interval, None, load=max(seen) if seen else None, cpus=os.cpu_count())
            variants[name].update({"speedup": interval, "noisy": noisy,
                                   "dense_median_ms": float(np.median(dense_ms)),
                                   "median_ms": float(np.median(variant_ms))})
            print(f"{name}: {interval['speedup']:.3f}× [{interval['low']:.3f}, {interval['high']:.3f}]"
                  + (f" (noisy: {'; '.join(noisy)})" if noisy else ""), flush=True)

        body = {"format": "slimdiff-deepcache-composition/1", "model": args.model,
                "weights": "trained proxy" if is_proxy(args.model) else "see model",
                "unet_weights_sha256": _weights_sha256(args.model), "git_commit": _git_commit(),
                "device": "cpu", "cpus": os.cpu_count(), "threads": args.threads,
                "budget_fraction_of_compressible_params": args.budget,
                "deepcache": {"package": "DeepCache", "cache_intervals": intervals, "cache_branch_id": args.branch},
                "settings": {"calibration_prompts": len(models.calibration_prompts), "eval_prompts": len(evals),
                             "steps": args.steps, "guidance": guidance, "prompts": models.prompt_note, "scheduler": type(dense.scheduler).__name__,
                             "seeds": "evaluation prompt i is sampled with seed i", "torch": torch.__version__,
                             "timing": "one image (batch 1, CFG) prompt to pixels, interleaved with dense"},
                "variants": variants,
                "ideal": {"what": "MAC ratios dense / variant over a whole run, UNet batch 2 (CFG), meta device, "
                                  "seeded-shape configs (no weights); plans remove a fraction of the transformer-block "
                                  "MACs with uniform scores", "rows": ideal},
                "load_average": [x for x in loads if x is not None], "total_s": round(time.perf_counter() - start, 1)}
        write_json(tmp / "deepcache_composition.json", body)
        (tmp / "deepcache_composition.md").write_text(markdown(body, args), encoding="utf-8")
        commit_output_dir(tmp, out)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"written to {out} in {time.perf_counter() - start:.0f} s")
    return 0


def markdown(body: dict, args) -> str:
    s = body["settings"]
    lines = ["# Slimming and DeepCache", "",
             f"## Measured on `{body['model']}` ({body['weights']}), CPU", "",
             f"Slim: {args.budget:g} of the compressible parameters removed (calibrated on {s['calibration_prompts']} "
             f"prompts). DeepCache: cache_branch_id {args.branch}, cache_interval as named. {s['eval_prompts']} "
             f"held-out prompts × {s['steps']} steps ({s['scheduler']}), guidance {s['guidance']:g}, same seeds. "
             f"Speed-up: one image (batch 1, CFG), {args.pairs} pairs interleaved with dense, median of pair ratios "
             f"and its 95 % bootstrap interval; {body['threads']} torch thread(s) on a {body['cpus']}-CPU shared VM. "
             "The proxy's CPU time is mostly per-module overhead: these speed-ups show what caching skips, not what "
             "slimming gains on a real model (see the ideal table).", "",
             "| variant | UNet parameters | PSNR dB vs dense (± s.e.) | SSIM | PSNR dB vs dense with the same cache "
             "| speed-up vs dense [95 % CI] |", "|---|---|---|---|---|---|"]
    for name, v in body["variants"].items():
        sp = v["speedup"]
        same = v.get("psnr_db_vs_dense_with_the_same")
        over_cache = f"{same['mean']:.2f} ± {same['stderr']:.2f}" if same else "—"
        lines.append(f"| {name} | {v['unet_parameters']:,} | {v['psnr_db']['mean']:.2f} ± {v['psnr_db']['stderr']:.2f} | "
                     f"{v['ssim']:.4f} | {over_cache} | "
                     f"{sp['speedup']:.3f}× [{sp['low']:.3f}, {sp['high']:.3f}]" + (" (noisy)" if v["noisy"] else "")
                     + " |")
    lines += ["", f"## Ideal (MAC ratios) at real shapes, {args.ideal_steps} steps, UNet batch 2", "",
              "Seeded-shape configs on the meta device (shapes only, no weights): dense / variant MACs over the run. "
              "A cached call runs what DeepCache's wrappers let run at this branch.", "",
              "| model | image | transformer MACs removed | interval | dense GMAC full / cached call | slimming saves "
              "on a cached call | slim × | DeepCache × | both × |", "|---|---|---|---|---|---|---|---|---|"]
    for r in body["ideal"]["rows"]:
        i = r["ideal_speedup"]
        lines.append(f"| {r['model']} | {r['image_px']}² | {r['fraction_of_transformer_macs_removed']:.0%} | "
                     f"{r['interval']} | {r['dense_gmac_per_call']['full']:.0f} / "
                     f"{r['dense_gmac_per_call']['cached']:.0f} | {r['slimming_saves_on_a_cached_call']:.1%} | "
                     f"{i[SLIM]:.3f} | {i[f'{DENSE} + DeepCache']:.3f} | {i[f'{SLIM} + DeepCache']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
