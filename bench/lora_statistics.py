#!/usr/bin/env python3
"""What slimming a LoRA'd model from the base model's statistics costs, against calibrating the fused model, and
against mapping the LoRA onto the slim base model (``--lora-maps``: no slimming per LoRA).

    PYTHONPATH=. python bench/lora_statistics.py --out bench/results/<date>-cpu-lora/

`slimdiff slim --lora FILE --stats BASE` fits the factors to the activations of the model without the LoRA (one
calibration serves many LoRAs); calibrating with `--lora` fits them to the fused model's. This script measures the
difference on the trained proxy model: for each LoRA strength it fuses a seeded random kohya-layout LoRA (rank
``--rank`` on every attention and FFN projection of the UNet, each ``B·A`` scaled to ``strength`` × the norm of
the weight it is added to), slims the fused model at ``--budget`` twice — from the base statistics and from the
fused model's own — and compares both with the dense fused model from the same seeds: PSNR / SSIM of the images
and the noise-prediction error along the dense trajectory. It also reports how far the LoRA moves the dense
model's own images (PSNR of dense vs dense + LoRA), so a LoRA too weak to matter shows as such. A third variant
slims the base model once (with ``lora_maps``) and loads each LoRA into it through diffusers' ``load_lora_weights``,
fused: what switching LoRAs on a slim model gives.

A random LoRA is not a trained one (a trained LoRA's update is aligned with its data): the figures bound the
statistics' mismatch for perturbations of a given size, on this proxy, and nothing more. Writes
``lora_statistics.json`` and ``lora_statistics.md`` into ``--out`` (whole or not at all).
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

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
MAPPED = "mapped onto the base slim model"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:proxy")
    p.add_argument("--strengths", default="0.05,0.2", help="‖B·A‖ / ‖W‖ per projection, comma-separated")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.4, help="fraction of the compressible parameters removed")
    p.add_argument("--calib-prompts", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    return p.parse_args(argv)


def random_kohya_lora(unet, path: Path, strength: float, rank: int, seed: int) -> int:
    """A seeded random LoRA in kohya's layout on every attention and FFN projection; returns how many layers."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, torch.nn.Linear) and name.endswith(PROJECTIONS)):
            continue
        weight = module.weight.detach().float()
        down = torch.randn(rank, weight.shape[1], generator=generator)
        up = torch.randn(weight.shape[0], rank, generator=generator)
        # alpha = rank: diffusers fuses up·down·(alpha/rank) = up·down, scaled here to strength × ‖W‖_F
        up *= strength * weight.norm() / (up @ down).norm()
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(),
                        f"{key}.alpha": torch.tensor(float(rank))})
    save_file(tensors, str(path))
    return len(tensors) // 3


def main(argv=None) -> int:
    args = parse_args(argv)
    from ablation import _git_commit, _prompts, _weights_sha256

    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.lora import LoraSpec
    from slimdiff.models import load_pipeline
    from slimdiff.quality import EvalSettings, compare, fidelity, noise_error_summary
    from slimdiff.quality.evaluate import is_proxy
    from slimdiff.quality.metrics import capped_psnrs, mean_and_stderr
    from slimdiff.quality.sampling import generate
    from slimdiff.quality.report import write_json
    from slimdiff.serialization import atomic_output_dir, commit_output_dir
    from slimdiff.slim import SlimConfig, slim_unet
    from slimdiff.slim_models import slim_class_for

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tmp = atomic_output_dir(out, overwrite=args.force)
    base = load_pipeline(args.model)
    guidance = 5.0 if is_proxy(args.model) else 7.5
    calib, evals, prompt_note = _prompts(args.model, base, args.calib_prompts, args.eval_prompts)
    calibration = CalibrationConfig(steps=args.steps, guidance_scale=guidance, seed=0, batch_size=8, pass1_prompts=16)
    settings = EvalSettings(steps=args.steps, guidance=guidance, seed=0, batch_size=16)
    config = SlimConfig(budget=args.budget)
    t0 = time.perf_counter()
    base_stats = calibrate(base, calib, None, calibration, progress=False)
    print(f"base statistics: {time.perf_counter() - t0:.0f} s", flush=True)
    base_images = generate(base, evals, list(range(len(evals))), steps=settings.steps, guidance=guidance,
                           batch_size=settings.batch_size)
    slim_base = copy.deepcopy(base.unet)
    slim_unet(slim_base, base_stats, SlimConfig(budget=args.budget, lora_maps=True), progress=False)
    slim_base = slim_class_for(slim_base).from_slim(slim_base, slim_base.slim_plan)
    rows = []
    try:
        for index, strength in enumerate(float(s) for s in args.strengths.split(",")):
            lora = tmp / f"random-lora-{strength:g}.safetensors"
            layers = random_kohya_lora(base.unet, lora, strength, args.rank, seed=index)
            fused = load_pipeline(args.model, loras=[LoraSpec(str(lora))])
            t0 = time.perf_counter()
            own_stats = calibrate(fused, calib, None, calibration, progress=False)
            calibration_s = time.perf_counter() - t0
            slims = {}
            for name, stats in (("base statistics", base_stats.adopted_by(own_stats.fingerprint)),
                                ("fused-model statistics", own_stats)):
                slims[name] = copy.deepcopy(fused.unet)
                slim_unet(slims[name], stats, config, progress=False)
            mapped = type(base)(**{**base.components, "unet": copy.deepcopy(slim_base)})
            mapped.load_lora_weights(str(lora), adapter_name="random")
            mapped.fuse_lora(adapter_names=["random"])
            mapped.unload_lora_weights()
            slims[MAPPED] = mapped.unet
            comp = compare(fused, slims, evals, settings, progress=False)
            moved = fidelity(base_images, comp.dense)["psnr_db"]["mean"]
            row = {"strength": strength, "layers": layers, "rank": args.rank, "fused_calibration_s": round(calibration_s, 1),
                   "psnr_dense_vs_dense_with_lora_db": moved, "variants": {}}
            per_image = {}
            for name in slims:
                fid = fidelity(comp.dense, comp.slims[name])
                npe = noise_error_summary(comp.noise_errors[name], comp.timesteps)
                per_image[name] = capped_psnrs(fid)
                row["variants"][name] = {"psnr_db": fid["psnr_db"]["mean"],
                                         "psnr_db_stderr": mean_and_stderr(per_image[name])["stderr"],
                                         "ssim": fid["ssim"]["mean"], "noise_prediction_error": npe["mean"]}
            gain = per_image["fused-model statistics"] - per_image["base statistics"]
            row["psnr_gain_of_fused_statistics_db"] = mean_and_stderr(gain)
            rows.append(row)
            print(f"strength {strength:g}: dense moved {moved:.1f} dB; " + "; ".join(
                f"{n}: {v['psnr_db']:.2f} dB, NPE {v['noise_prediction_error']:.4f}" for n, v in row["variants"].items())
                + f"; fused-statistics gain {gain.mean():+.2f} ± {mean_and_stderr(gain)['stderr']:.2f} dB", flush=True)
            mapping = per_image[MAPPED] - per_image["base statistics"]
            row["psnr_gain_of_mapping_over_base_statistics_db"] = mean_and_stderr(mapping)
            lora.unlink()  # seeded: --strengths and the seed order remake it
        body = {"format": "slimdiff-lora-statistics/2", "model": args.model, "weights": "trained proxy"
                if is_proxy(args.model) else "see model", "unet_weights_sha256": _weights_sha256(args.model),
                "git_commit": _git_commit(), "lora": "seeded random, kohya layout, alpha = rank, every attention and "
                "FFN projection; strength = ‖B·A‖_F / ‖W‖_F per projection (not a trained LoRA)",
                "budget_fraction_of_compressible_params": args.budget,
                "settings": {"calibration_prompts": len(calib), "eval_prompts": len(evals), "steps": args.steps,
                             "guidance": guidance, "threads": args.threads, "prompts": prompt_note,
                             "seeds": "evaluation prompt i is sampled with seed i", "torch": torch.__version__},
                "rows": rows, "total_s": round(time.perf_counter() - start, 1)}
        write_json(tmp / "lora_statistics.json", body)
        lines = [f"# Slimming a LoRA'd `{args.model}` from base vs fused statistics, or mapping the LoRA onto the slim base model", "",
                 f"Budget {args.budget:g} of the compressible parameters; {body['lora']}; rank {args.rank}. "
                 f"{len(calib)} calibration prompts, {len(evals)} evaluation prompts × {args.steps} steps; images "
                 "compared with the dense model with the LoRA fused, same seeds.", "",
                 "| strength | dense vs dense+LoRA PSNR dB | variant | PSNR dB (± s.e.) | SSIM | noise-pred. error "
                 "| paired PSNR gain over base statistics dB |",
                 "|---|---|---|---|---|---|---|"]
        for row in rows:
            gains = {"fused-model statistics": row["psnr_gain_of_fused_statistics_db"],
                     MAPPED: row["psnr_gain_of_mapping_over_base_statistics_db"]}
            for name, v in row["variants"].items():
                gain = f"{gains[name]['mean']:+.2f} ± {gains[name]['stderr']:.2f}" if name in gains else "—"
                lines.append(f"| {row['strength']:g} | {row['psnr_dense_vs_dense_with_lora_db']:.1f} | {name} | "
                             f"{v['psnr_db']:.2f} ± {v['psnr_db_stderr']:.2f} | {v['ssim']:.4f} | "
                             f"{v['noise_prediction_error']:.4f} | {gain} |")
        (tmp / "lora_statistics.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        commit_output_dir(tmp, out)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"written to {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
