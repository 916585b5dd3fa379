"""The >2 GB export path at real scale: ``builtin:sd15-shape`` (SD-1.5 UNet shapes, 3.4 GB in fp32) to ONNX
with external data, ONNX Runtime parity, and an ONNX Runtime engine built from it.

    python bench/large_export_check.py --out /tmp/sd15-check [--keep]

Too slow for the test suite on a 2-core CPU (export alone takes minutes and ~16 GB of memory), so it is a
benchmark: it prints one JSON line with the timings, sizes and parity errors, and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from slimdiff.errors import SlimDiffError


def check(out: Path, batch: str = "1:1:2", side: str = "256:512:512", text_len: str = "77") -> dict:
    import torch

    from slimdiff.engines import build_engine
    from slimdiff.models import load_unet
    from slimdiff.runtime import EngineUNet
    from slimdiff.export.modules import denoiser_component
    from slimdiff.export.onnx import export_onnx
    from slimdiff.export.shapes import parse_profiles

    timings = {}
    t0 = time.perf_counter()
    unet = load_unet("builtin:sd15-shape")
    timings["load_s"] = time.perf_counter() - t0
    profiles = parse_profiles(batch, side, side, text_len, vae_scale=8, multiple=8)
    component = denoiser_component(unet)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    sidecar = export_onnx(component, profiles, out / "unet.onnx")
    timings["export_and_parity_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    meta = build_engine("ort", component, out, axes=sidecar["axes"], profiles=sidecar["profiles"],
                        dtype=torch.float32, device="cpu", onnx_path=out / "unet.onnx",
                        extra={"unet_config": dict(unet.config)})
    timings["ort_engine_s"] = time.perf_counter() - t0
    engine = EngineUNet.from_folder(out)
    inputs = component.random_inputs({a: r["opt"] for a, r in sidecar["axes"].items()}, torch.float32, seed=3)
    with torch.no_grad():
        ref = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    got = engine(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    err = (got - ref).abs().max().item()
    return {
        "files": {f: (out / f).stat().st_size for f in sidecar["files"] + meta["files"]},
        "external_data": sidecar["external_data"], "fused": sidecar["fused"], "cleanup": sidecar["cleanup"],
        "onnx_parity": sidecar["parity"], "engine_max_abs_error": err,
        "engine_max_rel_error": err / ref.abs().max().item(), "engine_load_s": engine.load_seconds,
        **{k: round(v, 1) for k, v in timings.items()},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/large_export_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work folder (must not exist)")
    p.add_argument("--keep", action="store_true", help="keep the exported files")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"large_export_check: error: {str(out)!r} already exists", file=sys.stderr)
        return 2
    try:
        result = check(out)
    except SlimDiffError as exc:
        print(f"large_export_check: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        if not args.keep and out.exists():
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
