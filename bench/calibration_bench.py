#!/usr/bin/env python3
"""Calibration benchmark (issue 3): prompts/s and peak memory of the two-pass calibration, as JSON.

    python bench/calibration_bench.py                       # CPU: builtin:tiny, 16 prompts × 25 steps
    python3 bench/calibration_bench.py --device cuda         # GPU: builtin:sd15-shape fp16, 64 prompts × 25 steps
    python3 bench/calibration_bench.py --device cuda --prompts 500   # the full target run

It runs :func:`slimdiff.calibrate.calibrate` (pass 1 on the first ``--pass1-prompts`` prompts, pass 2 on all)
with the pipeline's own sampling loop at the model's resolution, classifier-free guidance 7.5, and records the
time of each pass (from calibration's per-batch callback), prompts per second, peak device memory (PyTorch's
allocator), peak host memory (the process's resident set) and the size of the statistics. From the measured
per prompt-step cost of each pass it projects the target run (default 500 prompts × 25 steps with a 64-prompt
pass 1) and checks it against the issue's limits: ≤ 10 GPU-minutes and ≤ 24 GiB host memory. A projection is a
projection: the JSON says whether the target itself was run. Built-in models have seeded random weights.

Prompts are the first N captions of the packaged COCO pool: the benchmark measures calibration, not SlimSet
selection (which ``slimdiff calibrate`` adds before it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

GPU_MINUTES_LIMIT, HOST_GIB_LIMIT = 10.0, 24.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default builtin:tiny on cpu, builtin:sd15-shape on cuda")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=None, help="prompts to calibrate (default 16 cpu, 64 cuda)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per sampling call (default 1 cpu, 8 cuda)")
    p.add_argument("--pass1-prompts", type=int, default=64)
    p.add_argument("--target-prompts", type=int, default=500)
    p.add_argument("--target-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/calibration.json if $OUT is set, "
                                               "else stdout only)")
    return p.parse_args(argv)


def _host_peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from slimdiff.bench.env import device_info, git_commit, library_versions, machine_info, weights_kind
    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.errors import SlimDiffError
    from slimdiff.export.meta import write_json_atomic
    from slimdiff.models import load_pipeline
    from slimdiff.prompts import read_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("calibration_bench: no CUDA device here", file=sys.stderr)
        return 2
    model = args.model or ("builtin:sd15-shape" if cuda else "builtin:tiny")
    n = args.prompts or (64 if cuda else 16)
    batch = args.batch_size or (8 if cuda else 1)
    dtype = torch.float16 if cuda else torch.float32
    try:
        t = time.perf_counter()
        pipe = load_pipeline(model, dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t
        prompts = read_prompts(limit=n)
        if len(prompts) < n:
            raise SlimDiffError(f"the packaged pool has only {len(prompts)} prompts")
        config = CalibrationConfig(steps=args.steps, batch_size=batch, pass1_prompts=min(args.pass1_prompts, n))
        marks: dict[str, list[float]] = {"pass1": [], "pass2": []}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()

        def on_batch(stage: str, done: int) -> None:
            if cuda:
                torch.cuda.synchronize()
            marks[stage].append(time.perf_counter())

        stats = calibrate(pipe, prompts, None, config, progress=False, on_batch=on_batch)
        if cuda:
            torch.cuda.synchronize()
        total_s = time.perf_counter() - t0
    except SlimDiffError as exc:
        print(f"calibration_bench: error: {exc}", file=sys.stderr)
        return 2
    pass1_s = marks["pass1"][-1] - t0
    pass2_s = marks["pass2"][-1] - marks["pass1"][-1]
    p1 = config.pass1_prompts
    # Cost per prompt-step of each pass, then the target run: pass 1 on min(64, T) prompts, pass 2 on T.
    c1, c2 = pass1_s / (p1 * args.steps), pass2_s / (n * args.steps)
    target_p1 = min(args.pass1_prompts, args.target_prompts)
    projected_s = (c1 * target_p1 + c2 * args.target_prompts) * args.target_steps
    stats_bytes = sum(v.numel() * v.element_size() for v in stats.tensors.values())
    host_peak = _host_peak_bytes()
    ran_target = n == args.target_prompts and args.steps == args.target_steps
    result = {
        "schema": "slimdiff-calibration-bench/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model, "weights": weights_kind(model), "dtype": str(dtype).removeprefix("torch."),
        "device": device_info(args.device), "machine": machine_info(), "libraries": library_versions(),
        "git": git_commit(),
        "config": {"prompts": n, "steps": args.steps, "batch_size": batch, "pass1_prompts": p1,
                   "guidance": config.guidance_scale if config.guidance_scale is not None else "pipeline default",
                   "resolution_px": pipe.unet.config.sample_size * pipe.vae_scale_factor},
        "load_s": round(load_s, 2), "calibration_s": round(total_s, 2),
        "pass1_s": round(pass1_s, 2), "pass2_s": round(pass2_s, 2),
        "prompts_per_s": (p1 + n) / total_s, "pass2_prompts_per_s": n / pass2_s,
        "unet_calls_per_prompt_step": sum(stats.visits) / args.steps if stats.visits else None,
        "peak_device_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "peak_host_rss_bytes": host_peak,
        "statistics_bytes": stats_bytes,
        "target": {"prompts": args.target_prompts, "steps": args.target_steps, "ran": ran_target,
                   "seconds": round(total_s if ran_target else projected_s, 1),
                   "how": "measured" if ran_target else "projected from this run's per prompt-step cost of each pass",
                   "fits_10_gpu_minutes": (total_s if ran_target else projected_s) <= 60 * GPU_MINUTES_LIMIT
                   if cuda else None,
                   "host_peak_within_24_gib": host_peak <= HOST_GIB_LIMIT * 2**30},
    }
    text = json.dumps(result, indent=1)
    print(text)
    out = args.out or (str(Path(os.environ["OUT"]) / "calibration.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
