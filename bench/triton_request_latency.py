"""One served text-to-image request against the same pipeline called in-process, interleaved.

    python bench/triton_request_latency.py --model builtin:tiny-xl --out bench-triton-latency/

Builds ONNX Runtime engines of the model's (dense) denoiser, text encoder(s) and VAE decoder at one image size and
writes a python-mode Triton repository from them — the calls ``slimdiff-export --triton-repo`` makes, without its
slimming — then serves it with the ``tritonserver`` bundled in nvidia-pytriton on 127.0.0.1. Each round times one
request to the ``pipeline`` model (HTTP, BLS calls to the engine models) and one call of the same diffusers
pipeline over the same engines in this process (``repository_pipeline`` with local runners), in alternating order;
both images must be equal. Writes ``latency.json``: per-round times, median and range of each, and of their ratio.
What it measures is the serving overhead on this machine, not the model's speed: say which weights and CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_repository(model: str, work: Path, size: int) -> Path:
    from slimdiff.engines.build import build_denoiser_engine
    from slimdiff.engines.triton import build_serving_engines, write_repository
    from slimdiff.export.shapes import latent_multiple, parse_profiles
    from slimdiff.families import family_for
    from slimdiff.models import load_pipeline

    pipe = load_pipeline(model)
    family = family_for(pipe)
    denoiser = family.denoiser(pipe)
    multiple = latent_multiple(denoiser.config)

    def build(batch: str) -> dict:
        # the family's text lengths: CLIP's 77 for SD / SDXL, the pipeline's T5 length for PixArt-Σ and SD3
        return {"profiles": parse_profiles(batch, str(size), str(size), family.default_text_len(pipe),
                                           vae_scale=pipe.vae_scale_factor, multiple=multiple),
                "dtype": torch.float32, "device": "cpu", "multiple": multiple}

    (work / "denoiser").mkdir()
    build_denoiser_engine(denoiser, "ort", work / "denoiser", **build("2"))  # one image under guidance
    folders = build_serving_engines(pipe, work, "ort", **build("1"))
    write_repository(work / "repo", pipe, work / "denoiser", folders, "python", pipeline_instances=1)
    return work / "repo"


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny-xl")
    p.add_argument("--size", type=int, default=32, help="image height and width in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import tritonclient.http as httpclient

    from slimdiff.engines.triton import local_server, request_image
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slimdiff-triton-latency-"))
    repo = build_repository(args.model, work, args.size)
    in_process = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
    options = {"height": args.size, "width": args.size}
    rounds = []
    with local_server(repo, timeout_s=300) as urls:
        client = httpclient.InferenceServerClient(urls["http"], network_timeout=600)

        def served(seed: int) -> np.ndarray:
            return request_image(client, "a red circle above a blue square", seed, args.steps, **options)

        def local(seed: int) -> np.ndarray:
            return generate(in_process, "a red circle above a blue square", seed=seed, steps=args.steps, **options)

        served(0), local(0)  # first calls: sessions and stubs warm up
        load_before = round(os.getloadavg()[0], 2)  # a shared machine: how busy it was, next to the figures
        for i in range(args.rounds):
            times, images = {}, {}
            for name, call in ((("served", served), ("in_process", local)) if i % 2 == 0 else
                               (("in_process", local), ("served", served))):
                t0 = time.perf_counter()
                images[name] = call(100 + i)
                times[name] = time.perf_counter() - t0
            rounds.append({**{f"{k}_s": round(v, 4) for k, v in times.items()},
                           "ratio": round(times["served"] / times["in_process"], 3),
                           "identical": bool(np.array_equal(images["served"], images["in_process"]))})
    report = {
        "model": args.model, "weights": "seeded random" if args.model.startswith("builtin:") else "as given",
        "engines": "onnxruntime, float32, CPU (python-mode repository)", "size": args.size, "steps": args.steps,
        "rounds": rounds, "served_s": summary([r["served_s"] for r in rounds]),
        "in_process_s": summary([r["in_process_s"] for r in rounds]), "ratio": summary([r["ratio"] for r in rounds]),
        "all_identical": all(r["identical"] for r in rounds),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
                    "python": sys.version.split()[0], "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
    }
    (out / "latency.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("served_s", "in_process_s", "ratio", "all_identical")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
