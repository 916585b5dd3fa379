#!/usr/bin/env python3
"""Distributed calibration benchmark (issue 13 §3): prompts/s of `calibrate` in 1 process vs K torchrun
processes, and whether every layout produced the same statistics bit for bit, as JSON.

    python bench/distributed_calibration.py                                  # CPU: builtin:tiny, 1×1, 1×2, 2×1
    python bench/distributed_calibration.py --layouts 1x1,4x1 --prompts 64   # more processes, where cores allow

A layout PxT is P processes (torchrun, gloo on loopback) with T CPU threads each. Runs are interleaved
(layouts rotate each repeat) because the machine may be shared; every run is a fresh launch. Only the
calibration itself is timed (inside rank 0, between barriers), so process start and model load are reported
apart. The digest is sha256 over every statistics tensor: equal digests mean bit-identical statistics.
Built-in models have seeded random weights: the speed of the sampling loop does not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the checkout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pass1-prompts", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=1, help="batches per chunk (default 1)")
    p.add_argument("--layouts", default="1x1,1x2,2x1", help="PxT: P processes with T threads each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    p.add_argument("--out", default=None, help="JSON file (default: stdout only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: result file of one run
    return p.parse_args(argv)


def worker(args) -> int:
    """One run, in every process of a layout: calibrate, rank 0 writes time and digest to ``args.worker``."""
    import torch

    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.distributed import process_group
    from slimdiff.models import load_pipeline
    from slimdiff.prompts import read_prompts

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    pipe = load_pipeline(args.model, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = CalibrationConfig(steps=args.steps, pass1_prompts=args.pass1_prompts,
                               checkpoint_every=args.checkpoint_every)
    with process_group("cpu") as group:
        group.barrier()
        start = time.perf_counter()
        stats = calibrate(pipe, read_prompts(limit=args.prompts), None, config, progress=False, group=group)
        seconds = time.perf_counter() - start  # calibrate ends with a barrier: every rank is done
    if stats is not None:
        digest = hashlib.sha256()
        for name, tensors in (("tensors", stats.tensors), ("weights", stats.timestep_weights)):
            for key in sorted(tensors):
                digest.update(f"{name}:{key}".encode())
                digest.update(tensors[key].contiguous().numpy().tobytes())
        Path(args.worker).write_text(json.dumps({"calibration_s": seconds, "digest": digest.hexdigest()}))
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, processes: int, threads: int, result: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    script = [str(Path(__file__).resolve()), "--model", args.model, "--prompts", str(args.prompts),
              "--steps", str(args.steps), "--pass1-prompts", str(args.pass1_prompts),
              "--checkpoint-every", str(args.checkpoint_every), "--worker", str(result)]
    cmd = [sys.executable, *script]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *script]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=args.timeout)
    finally:
        if proc.poll() is None:  # overran: the launcher and its workers share the session we started
            os.killpg(proc.pid, 9)
            proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}x{threads} run failed ({proc.returncode}):\n{out[-3000:]}")
    run = json.loads(result.read_text())
    return {**run, "wall_s": wall, "startup_and_load_s": wall - run["calibration_s"], "loadavg_1min_before": load}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from slimdiff.bench.env import git_commit, library_versions, machine_info, weights_kind
    from slimdiff.export.meta import write_json_atomic

    layouts = [tuple(int(x) for x in item.split("x")) for item in args.layouts.split(",")]
    runs: dict[str, list[dict]] = {f"{p}x{t}": [] for p, t in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            shift = repeat % len(layouts)
            for processes, threads in layouts[shift:] + layouts[:shift]:
                name = f"{processes}x{threads}"
                runs[name].append(_launch(args, processes, threads, Path(tmp) / f"{name}-{repeat}.json"))
                print(f"{name} run {repeat + 1}: {runs[name][-1]['calibration_s']:.2f} s", file=sys.stderr)
    summary = {}
    for name, items in runs.items():
        rates = sorted(args.prompts / r["calibration_s"] for r in items)
        summary[name] = {"processes": int(name.split("x")[0]), "threads_per_process": int(name.split("x")[1]),
                         "prompts_per_s_median": statistics.median(rates), "prompts_per_s_min": rates[0],
                         "prompts_per_s_max": rates[-1],
                         "startup_and_load_s_median": statistics.median(r["startup_and_load_s"] for r in items),
                         "digests": sorted({r["digest"] for r in items})}
    digests = {name: s["digests"] for name, s in summary.items()}
    result = {
        "schema": "slimdiff-distributed-calibration-bench/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "weights": weights_kind(args.model), "device": "cpu", "backend": "gloo (loopback)",
        "machine": machine_info(), "libraries": library_versions(), "git": git_commit(),
        "config": {"prompts": args.prompts, "steps": args.steps, "pass1_prompts": args.pass1_prompts,
                   "batch_size": 1, "checkpoint_every": args.checkpoint_every, "repeats": args.repeats},
        "prompts_per_s": "SlimSet prompts / calibration seconds (both passes: pass 1 samples the first "
                         "pass1_prompts again), timed on rank 0 between barriers",
        "summary": summary,
        "bit_identical_across_layouts": len({d for ds in digests.values() for d in ds}) == 1,
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
