"""Load test of a served slimdiff Triton repository: N concurrent clients × M prompt→image requests on loopback.

    python bench/triton_load.py --model builtin:tiny --clients 4 --requests 3 --out bench/results/DATE-cpu-triton

Builds the repository once (``slimdiff-export --triton-repo`` in ``python`` mode, ONNX Runtime engines on the
CPU), then serves it with the ``tritonserver`` bundled in nvidia-pytriton twice per round — with Triton's dynamic
batching on the engine models and without it — alternating the two over ``--rounds`` rounds (this machine is
shared and noisy: one timing is never trusted). Per configuration it reports p50/p99 request latency, throughput,
errors, Triton's own count of engine executions vs. batched items (the batching that happened), and whether every
served image equals the in-process pipeline's image for the same prompt and seed. Writes ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def build_repository(model: str, work: Path, calibration: list[str]) -> Path:
    from slimdiff.cli import export as cli

    rc = cli.main(["--model", model, "--engine", "ort", "--device", "cpu", "--out", str(work / "engines"),
                   "--slim-only", "--triton-repo", str(work / "repo"), "--triton-mode", "python", *calibration])
    if rc != 0:
        raise SystemExit(f"export failed with exit code {rc}")
    return work / "repo"


def configure(repo: Path, out: Path, *, dynamic_batching: bool, pipeline_instances: int) -> Path:
    """A copy of ``repo`` with dynamic batching on or off for the engine models and the pipeline's instances."""
    from slimdiff.engines.triton import PIPELINE, read_config, write_config

    shutil.copytree(repo, out)
    for model in sorted(p.name for p in out.iterdir() if p.name != PIPELINE):  # the engine models (SDXL: 4)
        config = read_config(out / model / "config.pbtxt")
        if not dynamic_batching:
            config.ClearField("dynamic_batching")
        write_config(out / model / "config.pbtxt", config)
    config = read_config(out / "pipeline" / "config.pbtxt")
    config.instance_group[0].count = pipeline_instances
    write_config(out / "pipeline" / "config.pbtxt", config)
    return out


def run_load(url: str, jobs: list[tuple[str, int]], clients: int, steps: int) -> tuple[list[dict], float]:
    """Each client sends its share of ``jobs`` one after another; returns per-request records and wall time."""
    import tritonclient.http as httpclient

    from slimdiff.engines.triton import request_image

    records: list[dict] = []
    lock = threading.Lock()

    def client_loop(index: int):
        client = httpclient.InferenceServerClient(url, network_timeout=600)
        for prompt, seed in jobs[index::clients]:
            t0 = time.perf_counter()
            try:
                image, error = request_image(client, prompt, seed, steps), None
            except Exception as exc:  # counted and reported, never hidden
                image, error = None, f"{type(exc).__name__}: {exc}"
            with lock:
                records.append({"prompt": prompt, "seed": seed, "latency_s": time.perf_counter() - t0,
                                "image": image, "error": error})

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def batching_stats(url: str) -> dict:
    """Triton's own statistics per engine model: executions vs. items (items/execution > 1 = batched)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    out = {}
    for model in ("text_encoder", "unet", "vae_decoder"):
        stats = client.get_inference_statistics(model)["model_stats"][0]
        out[model] = {"inference_count": int(stats["inference_count"]),
                      "execution_count": int(stats["execution_count"])}
        out[model]["items_per_execution"] = round(out[model]["inference_count"] / max(1, out[model]["execution_count"]), 2)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=3, help="requests per client and round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of (dynamic batching, none)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    p.add_argument("--calibration", default="--num-prompts 4 --steps 2 --pass1-prompts 2",
                   help="calibration flags of the export (few: the slim model's quality is not measured here)")
    p.add_argument("--repo", default=None, help="an existing python-mode repository (skips the export)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import tritonclient.http as httpclient

    from slimdiff.engines.triton import local_server, request_image
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slimdiff-triton-load-"))
    try:
        repo = Path(args.repo) if args.repo else build_repository(args.model, work, args.calibration.split())
        in_process = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
        jobs = [(f"{color} {shape} number {i}", 100 + i)
                for i, (color, shape) in enumerate([("a red", "circle"), ("a blue", "square"), ("two green", "triangles"),
                                                    ("a yellow", "star")] * (args.clients * args.requests))]
        jobs = jobs[:args.clients * args.requests]
        reference = {(p_, s): generate(in_process, p_, seed=s, steps=args.steps) for p_, s in jobs}
        runs = []
        for round_index in range(args.rounds):
            for dynamic in (True, False):
                name = "dynamic_batching" if dynamic else "no_batching"
                served = configure(repo, work / f"repo-{name}-{round_index}", dynamic_batching=dynamic,
                                   pipeline_instances=args.clients)
                with local_server(served, timeout_s=300) as urls:
                    request_image(httpclient.InferenceServerClient(urls["http"], network_timeout=600), "warm-up", 0,
                            args.steps)  # every model's first call (session warm-up) is not a measured request
                    records, wall = run_load(urls["http"], jobs, args.clients, args.steps)
                    stats = batching_stats(urls["http"])
                shutil.rmtree(served, ignore_errors=True)
                ok = [r for r in records if r["error"] is None]
                diffs = [int(np.abs(r["image"].astype(int) - reference[(r["prompt"], r["seed"])].astype(int)).max())
                         for r in ok]
                latencies = [r["latency_s"] for r in ok]
                runs.append({
                    "config": name, "round": round_index, "requests": len(records), "errors": len(records) - len(ok),
                    "error_messages": sorted({r["error"] for r in records if r["error"]})[:3],
                    "p50_s": round(percentile(latencies, 50), 3) if ok else None,
                    "p99_s": round(percentile(latencies, 99), 3) if ok else None,
                    "mean_s": round(statistics.mean(latencies), 3) if ok else None,
                    "wall_s": round(wall, 2), "throughput_images_per_s": round(len(ok) / wall, 3),
                    "images_identical_to_in_process": sum(d == 0 for d in diffs),
                    "max_abs_pixel_difference": max(diffs) if diffs else None,
                    "engine_batching": stats,
                })
                print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def commit():
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    import torch

    summary = {}
    for name in ("dynamic_batching", "no_batching"):
        mine = [r for r in runs if r["config"] == name]
        summary[name] = {k: [r[k] for r in mine] for k in ("p50_s", "p99_s", "throughput_images_per_s", "errors")}
    report = {
        "format": "slimdiff-triton-load/1",
        "what": "served text-to-image pipeline (python backend pipeline model calling text_encoder, unet, "
                "vae_decoder through BLS; ONNX Runtime engines on the CPU in Triton's python backend)",
        "model": args.model,
        "weights": ("seeded random (builtin:tiny): latency depends on shapes, not values" if args.model == "builtin:tiny"
                    else "trained proxy weights" if args.model == "builtin:proxy" else "as given"),
        "clients": args.clients, "requests_per_client": args.requests, "rounds": args.rounds, "steps": args.steps,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0], "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "server": "tritonserver 2.51 bundled in nvidia-pytriton (python backend only), 127.0.0.1",
        "git_commit": commit(),
        "summary": summary,
        "runs": runs,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"report written to {out / 'report.json'}")
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
