#!/usr/bin/env python3
"""Peak host memory of slimming from a statistics directory: read a site at a time vs every tensor held, as JSON.

    python bench/slim_memory.py                                   # builtin:sd15-shape, 64 px, 1 prompt × 2 steps
    python bench/slim_memory.py --stats stats/ --model my-flux/   # a calibration you already have

Calibrates ``--model`` on the CPU into a temporary statistics directory (unless ``--stats`` is given), then slims
it to ``--budget`` in fresh processes, alternately: ``from-disk`` is what ``slimdiff slim --stats`` does
(:meth:`Statistics.load`: tensors read when a site needs them), ``held`` first reads every tensor into memory (what
slimming did before statistics were read lazily; what an in-memory calibration hands over). Each process reports
its resident set once the model is loaded and the peak of its resident set from then on (Linux ``VmHWM``, reset
after loading), so the difference is what slimming itself held at its peak: statistics, factors, workspace. The size of the statistics depends on shapes only (the image size sets the token
counts, not the moment sizes), so a small image calibrates shape-true statistics quickly; built-in ``*-shape``
models have seeded random weights: the memory figures are real, the slim model's quality is not a claim.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

MODES = ("from-disk", "held")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:sd15-shape")
    p.add_argument("--stats", default=None, help="statistics directory (default: calibrate one into a temp dir)")
    p.add_argument("--resolution", type=int, default=64, help="calibration image size in px (default 64)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternated (default 2)")
    p.add_argument("--out", default=None, help="JSON file (default: stdout only)")
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now; VmHWM: its peak)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Start VmHWM again from the resident set now (Linux: ``clear_refs`` 5), so the peak of what follows is
    measured, not that of loading the model (which briefly holds more than the model)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")


def _child(args) -> dict:
    """One slimming run in this (fresh) process; its memory figures."""
    import dataclasses

    from slimdiff.calibrate import Statistics
    from slimdiff.families import family_for
    from slimdiff.models import load_pipeline
    from slimdiff.slim import SlimConfig, slim_unet

    import torch

    pipe = load_pipeline(args.model, torch.float32)
    denoiser = family_for(pipe).denoiser(pipe)
    _reset_peak()
    with_model = _status_bytes("VmRSS")
    stats = Statistics.load(args.stats)
    if args.child == "held":
        stats = dataclasses.replace(stats, tensors={k: stats.tensors[k] for k in stats.tensors})
    report = slim_unet(denoiser, stats, SlimConfig(budget=args.budget), progress=False)
    peak = _status_bytes("VmHWM")
    return {"mode": args.child, "rss_with_model_bytes": with_model, "peak_rss_bytes": peak,
            "peak_above_model_bytes": peak - with_model, "params_removed": report.plan.params_removed}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args)))
        return 0
    import torch

    from slimdiff.bench.env import git_commit, library_versions, machine_info, weights_kind
    from slimdiff.calibrate import CalibrationConfig, calibrate, statistics_bytes
    from slimdiff.families import family_for
    from slimdiff.models import load_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        stats_dir = args.stats
        pipe = load_pipeline(args.model, torch.float32)
        timesteps = args.steps
        if stats_dir is None:
            stats_dir = str(Path(tmp) / "stats")
            config = CalibrationConfig(steps=args.steps, pass1_prompts=1, height=args.resolution,
                                       width=args.resolution)
            stats = calibrate(pipe, ["a photo of a red cube on a wooden table"], stats_dir, config)
            timesteps = len(stats.timesteps)
            del stats
        size = sum(statistics_bytes(family_for(pipe).denoiser(pipe), timesteps).values())
        del pipe
        runs = []
        for _ in range(args.repeats):
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model,
                                      "--stats", stats_dir, "--budget", str(args.budget)],
                                     check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
                print(f"{mode}: peak {runs[-1]['peak_rss_bytes'] / 2**30:.2f} GiB, "
                      f"{runs[-1]['peak_above_model_bytes'] / 2**30:.2f} GiB above the loaded model", file=sys.stderr)
    result = {
        "model": args.model, "weights": weights_kind(args.model), "statistics_bytes": size,
        "timesteps": timesteps, "budget": args.budget, "runs": runs,
        "peak_above_model_gib": {m: [round(r["peak_above_model_bytes"] / 2**30, 3) for r in runs if r["mode"] == m]
                                 for m in MODES},
        "machine": machine_info(), "libraries": library_versions(), "git": git_commit(),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
