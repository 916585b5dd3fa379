"""How far can a speed-up interval be trusted? Coverage of the bench's interval on real interleaved timings.

    python bench/interval_coverage.py --out bench/results/<date>-cpu/interval-coverage

Several fresh processes each time one long interleaved run (dense and slim, alternating pairs, as
``slimdiff bench`` does) — on a quiet machine, then with a one-core load generator beside them. The pairs are
cut into windows of the size the bench uses (20 pairs), each window gets its 95 % interval, and the report
counts how often that interval contains the value pooled over every process: the interval's real coverage.
Two estimators are compared on the same samples: the ratio of the dense and slim medians (what the bench
reported before) and the median of the per-pair ratios (what it reports now). A ratio that changes from one
process to the next by more than its interval says is what this checks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LOAD_SCRIPT = """
import time, torch
torch.set_num_threads(1)
a = torch.randn(1500, 1500)
while True:  # a neighbour on the other core: bursts of cache- and bandwidth-heavy work with short pauses
    a @ a
    if int(time.time()) % 3 == 0:
        time.sleep(0.02)
"""


def worker(args) -> None:
    import torch

    from slimdiff.bench.harness import _Inputs
    from slimdiff.bench.plans import make_models
    from slimdiff.bench.timing import time_interleaved
    from slimdiff.families import family_for
    from slimdiff.models import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, torch.float32)
    family = family_for(pipe)
    size = family.denoiser(pipe).config.sample_size
    dense, slim = make_models(family.denoiser(pipe), [0.0, args.budget], seed=0)
    inputs = _Inputs(pipe, family, (size, size), size * pipe.vae_scale_factor, "cpu", torch.float32,
                     "a photograph of a cat", 0)
    call = inputs.get(args.batch)
    d, s = time_interleaved(lambda: family.export_call(dense.denoiser, *call),
                            lambda: family.export_call(slim.denoiser, *call), "cpu", 3, args.pairs)
    print(json.dumps({"dense_ms": d, "slim_ms": s}))


def ratio_of_medians(d, s, rng, resamples=2000):
    index = rng.integers(0, len(d), (resamples, len(d)))
    boot = np.median(d[index], 1) / np.median(s[index], 1)
    return np.median(d) / np.median(s), *np.quantile(boot, [0.025, 0.975])


def median_pair_ratio(d, s, rng, resamples=2000):
    from slimdiff.bench.timing import speedup_interval

    iv = speedup_interval(list(d), list(s), resamples=resamples, seed=int(rng.integers(1 << 30)))
    return iv["speedup"], iv["low"], iv["high"]


ESTIMATORS = {"ratio of medians (before)": (ratio_of_medians, lambda d, s: np.median(d) / np.median(s)),
              "median of pair ratios (now)": (median_pair_ratio, lambda d, s: np.median(d / s))}


def analyse(runs: list[dict], windows: list[int], noisy_width: float) -> dict:
    rng = np.random.default_rng(0)
    dense = [np.asarray(r["dense_ms"]) for r in runs]
    slim = [np.asarray(r["slim_ms"]) for r in runs]
    out = {}
    for name, (interval, point) in ESTIMATORS.items():
        pooled = float(point(np.concatenate(dense), np.concatenate(slim)))
        per_process = [float(point(d, s)) for d, s in zip(dense, slim)]
        cells = {}
        for w in windows:
            hits, widths = [], []
            for d, s in zip(dense, slim):
                for k in range(0, len(d) - w + 1, w):
                    est, low, high = interval(d[k:k + w], s[k:k + w], rng)
                    hits.append(bool(low <= pooled <= high))
                    widths.append(float((high - low) / est))
            cells[str(w)] = {"windows": len(hits), "coverage": float(np.mean(hits)),
                             "median_relative_width": float(np.median(widths)),
                             "reportable": float(np.mean(np.asarray(widths) <= noisy_width))}
        out[name] = {"pooled": pooled, "per_process": per_process,
                     "process_spread": [min(per_process) / pooled - 1, max(per_process) / pooled - 1],
                     "windows": cells}
    return out


def collect(args, condition: str) -> list[dict]:
    load = None
    if condition == "loaded":
        load = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT], env={**os.environ, "OMP_NUM_THREADS": "1"})
        time.sleep(2)
    runs = []
    try:
        for i in range(args.processes):
            cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--budget", str(args.budget),
                   "--batch", str(args.batch), "--pairs", str(args.pairs), "--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{condition}: process {i + 1}/{args.processes} done", file=sys.stderr, flush=True)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    return runs


def markdown(body: dict) -> str:
    lines = [f"# Speed-up interval coverage — {body['model']}, budget {body['budget']}, batch {body['batch']}, "
             f"{body['threads']} thread(s)", "",
             f"{body['machine']}; {body['processes']} fresh processes × {body['pairs']} interleaved pairs per "
             f"condition; weights: {body['weights']}. Coverage = share of windows whose 95 % interval contains "
             f"the value pooled over all processes; reportable = interval narrower than "
             f"{100 * body['noisy_width']:.0f} % (the bench's limit).", "",
             "| condition | estimator | pooled | per-process range | window | coverage | median width | reportable |",
             "|---|---|---|---|---|---|---|---|"]
    for condition, result in body["conditions"].items():
        for name, r in result.items():
            lo, hi = min(r["per_process"]), max(r["per_process"])
            for w, c in r["windows"].items():
                lines.append(f"| {condition} | {name} | {r['pooled']:.4f} | {lo:.4f}–{hi:.4f} | {w} pairs | "
                             f"{100 * c['coverage']:.0f} % of {c['windows']} | "
                             f"{100 * c['median_relative_width']:.1f} % | {100 * c['reportable']:.0f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:proxy")
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pairs", type=int, default=240)
    p.add_argument("--processes", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", default="20,40")
    p.add_argument("--conditions", default="quiet,loaded")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from slimdiff.bench.env import machine_info, weights_kind
    from slimdiff.bench.timing import NOISY_MAX_RELATIVE_WIDTH

    if args.out and Path(args.out).exists():
        print(f"error: {args.out} exists", file=sys.stderr)
        return 2
    machine = machine_info()
    body = {"schema": "slimdiff-interval-coverage/1", "model": args.model, "weights": weights_kind(args.model),
            "budget": args.budget, "plan": "synthetic (uniform scores)", "batch": args.batch, "pairs": args.pairs,
            "processes": args.processes, "threads": args.threads, "noisy_width": NOISY_MAX_RELATIVE_WIDTH,
            "machine": f"{machine['cpu']} × {machine['cpu_count']}", "load_generator": LOAD_SCRIPT.strip(),
            "conditions": {}, "raw": {}}
    windows = [int(w) for w in args.windows.split(",")]
    for condition in args.conditions.split(","):
        runs = collect(args, condition)
        body["raw"][condition] = runs
        body["conditions"][condition] = analyse(runs, windows, NOISY_MAX_RELATIVE_WIDTH)
    text = markdown(body)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps(body, indent=1))
        (out / "report.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
