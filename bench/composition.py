"""What the composition benchmarks (``deepcache_composition.py``, ``quantization_composition.py``) share: their
common flags, and the dense pipeline with the slim UNet they stack another acceleration on."""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

DENSE, SLIM = "dense", "slim"


def add_slimming_arguments(parser: argparse.ArgumentParser, threads: int) -> None:
    """The model, the slimming budget, the calibration and evaluation prompts and steps, the output folder."""
    parser.add_argument("--model", default="builtin:proxy")
    parser.add_argument("--budget", type=float, default=0.4, help="fraction of the compressible parameters removed")
    parser.add_argument("--calib-prompts", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=threads, help="torch threads")
    parser.add_argument("--out", required=True)
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


@dataclass(frozen=True)
class DenseAndSlim:
    """The dense pipeline, a slim copy of its UNet (slimdiff's defaults at ``budget``, calibrated on the dense
    model), and the prompts: evaluation (held out), calibration, and where they come from."""

    dense: object  # the diffusers pipeline
    slim_unet: object
    guidance: float
    evals: list[str]
    calibration_prompts: list[str]
    prompt_note: str

    def pipeline(self, unet):
        """A pipeline sharing the dense one's components with ``unet`` as its UNet."""
        pipe = type(self.dense)(**{**self.dense.components, "unet": unet})
        pipe.set_progress_bar_config(disable=True)
        return pipe


def dense_and_slim(args) -> DenseAndSlim:
    """Load ``args.model``, calibrate it on ``args.calib_prompts`` prompts × ``args.steps`` steps and slim a copy of
    its UNet at ``args.budget``."""
    from ablation import _prompts

    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.models import load_pipeline
    from slimdiff.quality.evaluate import is_proxy
    from slimdiff.slim import SlimConfig, slim_unet

    dense = load_pipeline(args.model)
    dense.set_progress_bar_config(disable=True)
    guidance = 5.0 if is_proxy(args.model) else 7.5
    calib, evals, prompt_note = _prompts(args.model, dense, args.calib_prompts, args.eval_prompts)
    stats = calibrate(dense, calib, None, CalibrationConfig(steps=args.steps, guidance_scale=guidance, seed=0,
                                                            batch_size=8, pass1_prompts=16), progress=False)
    slim = copy.deepcopy(dense.unet)
    slim_unet(slim, stats, SlimConfig(budget=args.budget), progress=False)
    return DenseAndSlim(dense, slim, guidance, evals, calib, prompt_note)


def fidelity_to_dense(images: dict, name: str) -> dict:
    """PSNR (mean ± standard error over the images) and SSIM of variant ``name``'s images against the dense model's;
    for a ``slim + X`` variant also against ``dense + X``'s (``psnr_db_vs_dense_with_the_same``): slimming's own error
    under X."""
    from slimdiff.quality import fidelity
    from slimdiff.quality.metrics import capped_psnrs, mean_and_stderr

    fid = fidelity(images[DENSE], images[name])
    row = {"psnr_db": mean_and_stderr(capped_psnrs(fid)), "ssim": fid["ssim"]["mean"]}
    if name.startswith(f"{SLIM} + "):
        same = fidelity(images[name.replace(SLIM, DENSE, 1)], images[name])
        row["psnr_db_vs_dense_with_the_same"] = mean_and_stderr(capped_psnrs(same))
    return row
