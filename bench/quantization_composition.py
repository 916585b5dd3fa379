#!/usr/bin/env python3
"""Slimming stacked with INT8 post-training quantization (torchao): the error each adds, alone and together, on the
trained proxy.

    PYTHONPATH=. python bench/quantization_composition.py --out bench/results/<date>-cpu-int8/

Users ask that a compressed model compose with INT8/FP8 PTQ (peers.md, user ask 6, baseline 8). A slim UNet is a
diffusers UNet with narrower Linears, so torchao's one verb takes it as it takes the dense one:
``quantize_(slim_unet, Int8WeightOnlyConfig())``. This script quantizes the Linears of the dense and the slim UNet
(slim: ``--budget`` of the compressible parameters, slimdiff's defaults, calibrated on the dense model) with
torchao's INT8 weight-only and INT8 dynamic-activation (W8A8) configs, samples the same held-out prompts from the
same seeds with each, and reports PSNR / SSIM against the dense images, the slim model's own error under the same
quantization (slim + INT8 against dense + INT8), and the bytes the Linear weights take (torchao's tensors counted by
their inner tensors: INT8 values and scales). No timing: torchao's CPU kernels on an overhead-bound model say
nothing of a TensorRT or ModelOpt INT8 engine. Writes ``quantization_composition.json`` and ``.md`` into ``--out``
(whole or not at all).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from composition import DENSE, SLIM, add_slimming_arguments, dense_and_slim, fidelity_to_dense  # noqa: E402

#: torchao configurations by the name the report gives them.
QUANTIZATIONS = {"INT8 weight-only": "Int8WeightOnlyConfig",
                 "INT8 W8A8 dynamic": "Int8DynamicActivationInt8WeightConfig"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slimming_arguments(p, threads=2)
    return p.parse_args(argv)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) by the inner tensors it flattens to."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.nn.Parameter:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def linear_weight_bytes(model: torch.nn.Module) -> int:
    return sum(tensor_bytes(m.weight.data if isinstance(m.weight, torch.nn.Parameter) else m.weight)
               for m in model.modules() if isinstance(m, torch.nn.Linear))


def quantized(unet, config_name: str):
    """A copy of ``unet`` whose Linears torchao quantized with its ``config_name`` configuration."""
    import torchao.quantization as ao

    copied = copy.deepcopy(unet)
    ao.quantize_(copied, getattr(ao, config_name)())
    return copied


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torchao  # noqa: F401  (before any slow work)
    except ImportError:
        print("this benchmark needs torchao: pip install 'slimdiff[bench]'", file=sys.stderr)
        return 2
    from ablation import _git_commit, _weights_sha256

    from slimdiff.quality.evaluate import is_proxy
    from slimdiff.quality.report import write_json
    from slimdiff.quality.sampling import generate
    from slimdiff.serialization import atomic_output_dir, commit_output_dir

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tmp = atomic_output_dir(out, overwrite=args.force)
    try:
        models = dense_and_slim(args)
        dense, guidance, evals = models.dense, models.guidance, models.evals
        unets = {DENSE: dense.unet, SLIM: models.slim_unet}
        for label, config_name in QUANTIZATIONS.items():
            for base in (DENSE, SLIM):
                unets[f"{base} + {label}"] = quantized(unets[base], config_name)
        print(f"calibrated, slimmed and quantized in {time.perf_counter() - start:.0f} s", flush=True)

        seeds = list(range(len(evals)))
        images = {}
        for name, unet in unets.items():
            with torch.no_grad():
                images[name] = generate(models.pipeline(unet), evals, seeds, steps=args.steps, guidance=guidance,
                                        batch_size=16)
        variants = {}
        for name, unet in unets.items():
            row = {"linear_weight_bytes": linear_weight_bytes(unet)}
            if name != DENSE:
                row.update(fidelity_to_dense(images, name))
            variants[name] = row
            quality = f"{row['psnr_db']['mean']:.2f} ± {row['psnr_db']['stderr']:.2f} dB vs dense, " \
                if "psnr_db" in row else ""
            print(f"{name}: {quality}{row['linear_weight_bytes'] / 2**20:.2f} MiB of Linear weights", flush=True)

        body = {"format": "slimdiff-quantization-composition/1", "model": args.model,
                "weights": "trained proxy" if is_proxy(args.model) else "see model",
                "unet_weights_sha256": _weights_sha256(args.model), "git_commit": _git_commit(), "device": "cpu",
                "budget_fraction_of_compressible_params": args.budget,
                "quantization": {"library": "torchao", "version": torchao.__version__,
                                 "configs": QUANTIZATIONS, "what": "every nn.Linear of the UNet (torchao's default "
                                 "filter); convolutions stay float32"},
                "settings": {"calibration_prompts": len(models.calibration_prompts), "eval_prompts": len(evals),
                             "steps": args.steps, "guidance": guidance, "prompts": models.prompt_note, "scheduler": type(dense.scheduler).__name__,
                             "seeds": "evaluation prompt i is sampled with seed i", "torch": torch.__version__},
                "variants": variants, "total_s": round(time.perf_counter() - start, 1)}
        write_json(tmp / "quantization_composition.json", body)
        (tmp / "quantization_composition.md").write_text(markdown(body, args), encoding="utf-8")
        commit_output_dir(tmp, out)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"written to {out} in {time.perf_counter() - start:.0f} s")
    return 0


def markdown(body: dict, args) -> str:
    s = body["settings"]
    lines = [f"# Slimming and INT8 quantization on `{body['model']}` ({body['weights']}), CPU", "",
             f"Slim: {args.budget:g} of the compressible parameters removed (calibrated on {s['calibration_prompts']} "
             f"prompts). Quantization: torchao {body['quantization']['version']}, {body['quantization']['what']}. "
             f"{s['eval_prompts']} held-out prompts × {s['steps']} steps ({s['scheduler']}), guidance "
             f"{s['guidance']:g}, same seeds. No timing (see the script).", "",
             "| variant | Linear weights MiB | PSNR dB vs dense (± s.e.) | SSIM | PSNR dB vs dense with the same "
             "quantization |", "|---|---|---|---|---|"]
    for name, v in body["variants"].items():
        psnr = f"{v['psnr_db']['mean']:.2f} ± {v['psnr_db']['stderr']:.2f}" if "psnr_db" in v else "—"
        ssim = f"{v['ssim']:.4f}" if "ssim" in v else "—"
        same = v.get("psnr_db_vs_dense_with_the_same")
        same_text = f"{same['mean']:.2f} ± {same['stderr']:.2f}" if same else "—"
        lines.append(f"| {name} | {v['linear_weight_bytes'] / 2**20:.2f} | {psnr} | {ssim} | {same_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
