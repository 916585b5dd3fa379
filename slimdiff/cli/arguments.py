"""The flags that several commands share: the model to load, and how to calibrate it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..hub_cache import resolve_model_source


def add_version_argument(p: argparse.ArgumentParser) -> None:
    from .. import __version__

    p.add_argument("--version", action="version", version=f"slimdiff {__version__}")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=resolve_model_source,
                   help="a built-in (builtin:tiny, builtin:tiny-xl, builtin:tiny-xl-refiner, builtin:tiny-pixart, "
                        "builtin:tiny-sd3, builtin:tiny-flux, the *-shape models...), a diffusers pipeline folder "
                        "(SD, SDXL base or refiner, PixArt, SD3, FLUX), a .safetensors checkpoint, or the Hub id of a "
                        "model in this machine's Hugging Face cache (nothing is downloaded)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--config", default=None, metavar="DIR", type=resolve_model_source,
                   help="for a single-file .safetensors checkpoint: a diffusers folder with its configuration "
                        "(default: the shipped SD-1.x / SD-2.x configuration matching the checkpoint)")
    p.add_argument("--variant", default=None,
                   help="weight variant of a pipeline folder, e.g. fp16 (default: the plain files, or the only "
                        "variant present)")
    add_lora_argument(p)


def add_lora_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (.safetensors: kohya/A1111, diffusers or PEFT layout) fused into the model before "
                        "anything else, at SCALE (default 1); repeat for several, fused in order")


def lora_specs(args) -> list:
    """The ``--lora`` flags as :class:`slimdiff.lora.LoraSpec` (``args`` keeps the text: it is recorded as JSON)."""
    from ..lora import LoraSpec

    return [LoraSpec.parse(text) for text in args.lora]


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=None,
                   help="prompt pool: .txt, .csv/.tsv with a prompt column, or COCO captions JSON "
                        "(default: the packaged COCO val2017 captions)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="inpainting models, FLUX Control, FLUX Kontext and the SDXL refiner: a folder of images "
                        "(PNG/JPEG/WebP) calibration fills seeded holes in, conditions on (FLUX Control: depth or edge "
                        "maps), edits (FLUX Kontext) or refines, one per prompt in turn (e.g. COCO photographs); the "
                        "refiner takes --base instead")
    p.add_argument("--strength", type=float, default=None,
                   help="with --images: the fraction of the schedule re-run over each image (default: inpainting "
                        "1.0, the SDXL refiner its pipeline's 0.3; the refiner runs int(steps × strength) steps)")
    p.add_argument("--base", default=None, metavar="MODEL", type=resolve_model_source,
                   help="the SDXL refiner, instead of --images: an SDXL base model (built-in, pipeline folder, "
                        ".safetensors or slim folder, as --model) whose latents the refiner refines in calibration, "
                        "as in diffusers' ensemble of expert denoisers: each prompt is sampled by the base to "
                        "denoising_end=--refiner-start, and by the refiner from there on")
    p.add_argument("--refiner-start", type=float, default=None, metavar="F",
                   help="with --base: the fraction of the schedule the base runs before the refiner takes over its "
                        "latents, in (0, 1) (default 0.8, diffusers' hand-over and the Triton --refiner ensemble's); "
                        "the refiner runs the steps whose timestep is below (1 - F) × 1000")
    p.add_argument("--num-prompts", type=int, default=500, help="SlimSet size (default 500)")
    p.add_argument("--steps", type=int, default=25,
                   help="sampling steps per prompt (default 25; step-distilled models — LCM, Turbo, Lightning: the "
                        "steps they are used at, e.g. 4)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's own — SD 7.5, SDXL 5.0, PixArt 4.5, "
                        "SD3 7.0; FLUX.1-dev and LCM UNets embed it: FLUX 3.5, LCM the SD / SDXL default)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per sampling call (default 1)")
    p.add_argument("--pass1-prompts", type=int, default=64, help="prompts for the timestep-weight pass (default 64)")
    p.add_argument("--weighting", default="trq", choices=["trq", "uniform", "single"],
                   help="timestep weighting of the statistics (default trq)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=8, metavar="BATCHES",
                   help="batches per chunk (default 8): the unit of checkpoints, of the work dealt to torchrun "
                        "processes and of the fixed summation order — changing it changes the last bits")


def calibration_config_from_args(args):
    from ..calibrate import CalibrationConfig

    images = None if args.images is None else str(Path(args.images).resolve())  # resumed from anywhere
    return CalibrationConfig(steps=args.steps, guidance_scale=args.guidance, height=args.resolution,
                             width=args.resolution, seed=args.seed, batch_size=args.batch_size,
                             pass1_prompts=args.pass1_prompts, weighting=args.weighting,
                             checkpoint_every=args.checkpoint_every, images=images, strength=args.strength,
                             **base_arguments(args.base, args.refiner_start))


def refuse_sampling_flags(args, why: str) -> None:
    """One line when flags that say what calibration samples (``--images``, ``--strength``, ``--base``,
    ``--refiner-start``) are given to a run that samples nothing (``why``): they would be ignored."""
    from ..errors import SlimDiffError

    given = [flag for flag, value in (("--images", args.images), ("--strength", args.strength), ("--base", args.base),
                                      ("--refiner-start", args.refiner_start)) if value is not None]
    if given:
        raise SlimDiffError(f"{' and '.join(given)} say what calibration samples, but {why}: leave them out")


def base_arguments(base: str | None, refiner_start: float | None) -> dict:
    """``CalibrationConfig``'s ``base`` and ``refiner_start`` of the flags ``--base`` and ``--refiner-start`` (a
    base's path resolved: the statistics record it, and a calibration resumed from anywhere compares it)."""
    from ..errors import SlimDiffError

    if base is None:
        if refiner_start is not None:
            raise SlimDiffError("--refiner-start is where the base model hands its latents to the refiner: give "
                                "--base too")
        return {}
    source = base if base.startswith("builtin:") else str(Path(base).resolve())
    return {"base": source, **({} if refiner_start is None else {"refiner_start": refiner_start})}


def calibration_clock(prog: str, pipe, pool_size: int, args):
    """On a CPU, the callback that says how long calibration will take (measured on the first prompts)."""
    from ..estimate import CalibrationClock
    from ..families import family_for

    if family_for(pipe).denoiser(pipe).device.type != "cpu":
        return None
    return CalibrationClock(prog, min(args.num_prompts, pool_size), args.pass1_prompts, args.batch_size,
                            chunk_batches=args.checkpoint_every)
