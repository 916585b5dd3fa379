"""``slimdiff eval``: quality of a slim model against its dense model, from identical seeds.

    slimdiff eval --model DENSE --slim SLIM [--prompts FILE] --num N --steps S --out DIR

Writes ``DIR/report.json``, ``DIR/report.md`` and ``DIR/grid.png`` (dense row over slim row, same seeds per
column); with ``--save-images`` or ``--fid-real`` also ``DIR/images/{dense,slim}/NNNNN.png``. The folder is
built under a temporary name and renamed into place, so it appears complete or not at all.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ..devices import resolve_device
from ..errors import SlimDiffError
from ..hub_cache import resolve_model_source

# The proxy's own evaluation (python -m slimdiff.proxy.evaluate) draws held-out prompts with this seed.
HELDOUT_PROMPT_SEED = 12345
# Which PartiPrompts `slimdiff eval` samples when no --prompts are given: fixed, so reports compare across runs.
EVALUATION_PROMPT_SEED = 0
PROXY_GUIDANCE = 5.0  # the guidance the proxy model is trained and evaluated for
SD_GUIDANCE = 7.5


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="compare a slim model with its dense model (fidelity, noise error, "
                                           "adherence, optional CLIP/FID)")
    p.add_argument("--model", required=True, type=resolve_model_source,
                   help="dense model: built-in name, pipeline folder, .safetensors or a Hub id in the Hugging Face cache")
    p.add_argument("--slim", required=True, type=resolve_model_source,
                   help="slim UNet / transformer folder from `slimdiff slim`, or any other pipeline to compare against "
                        "the dense one")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA fused into the dense model (repeat for several); default: the LoRAs a slim folder "
                        "was made with")
    p.add_argument("--prompts", default=None,
                   help="prompt file (.txt, .csv/.tsv, COCO JSON); default: a fixed sample of the packaged "
                        "PartiPrompts (other prompts than calibration's COCO captions), for the proxy model its "
                        "held-out prompts")
    p.add_argument("--num", type=int, default=32,
                   help="number of prompts (of a --prompts file its first N; default 32)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"CFG scale (default {PROXY_GUIDANCE} for the proxy model, {SD_GUIDANCE} otherwise)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampling call (default 8)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="inpainting models, FLUX Control, FLUX Kontext and the SDXL refiner: a folder of images "
                        "(PNG/JPEG/WebP) image i starts from, is conditioned on or edits, in turn (inpainting: with "
                        "calibration's seeded holes); default: one synthetic image")
    p.add_argument("--strength", type=float, default=None,
                   help="with an inpainting model or the SDXL refiner: its pipeline's strength (default: inpainting "
                        "1.0, the refiner's pipeline's 0.3)")
    p.add_argument("--base", default=None, metavar="MODEL", type=resolve_model_source,
                   help="the SDXL refiner: compare it as served after this SDXL base (diffusers' ensemble of expert "
                        "denoisers): the dense base samples each prompt to --refiner-start, the dense and the slim "
                        "refiner denoise its latents from there")
    p.add_argument("--refiner-start", type=float, default=None,
                   help="with --base: where the base hands its latents to the refiner, in (0, 1) (default 0.8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--grid", type=int, default=8, help="columns of the PNG grid (default 8)")
    p.add_argument("--adherence", choices=("auto", "on", "off"), default="auto",
                   help="prompt adherence with the proxy analyzer (auto: only for the proxy model)")
    p.add_argument("--save-images", action="store_true", help="also write every image as a PNG")
    p.add_argument("--clip-model", default=None, help="open_clip architecture for CLIP score, e.g. ViT-L-14")
    p.add_argument("--clip-weights", default=None, help="local open_clip checkpoint for --clip-model")
    p.add_argument("--fid-real", default=None, help="folder of real images for FID (clean-fid or torch-fidelity)")
    p.add_argument("--fid-weights", default=None, help="local Inception weights for torch-fidelity")
    p.add_argument("--out", required=True, help="report folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing report folder")
    p.set_defaults(func=run)
    return p


def _load_slim(source: str, dense_unet, dtype, device):
    """The denoiser to compare: a slim folder's, or the denoiser of any other pipeline (dense baselines)."""
    from ..families import family_for
    from ..models import load_pipeline
    from ..serialization import load_plan, load_slim, slim_denoiser_folder

    if (folder := slim_denoiser_folder(source)) is not None:  # also a slim pipeline folder's denoiser
        unet, made_from = load_slim(folder, dtype=dtype), load_plan(folder).info.get("source_model")
    else:
        pipe = load_pipeline(source, dtype)
        unet, made_from = family_for(pipe).denoiser(pipe), None
    if family_for(unet).name != family_for(dense_unet).name:
        raise SlimDiffError(f"--slim {source!r} is not comparable with the dense model: it is a "
                            f"{type(unet).__name__}, the dense one a {type(dense_unet).__name__}")
    for key in ("in_channels", "out_channels", "cross_attention_dim", "joint_attention_dim", "sample_size"):
        if unet.config.get(key) != dense_unet.config.get(key):
            raise SlimDiffError(f"--slim {source!r} is not comparable with the dense model: its denoiser has "
                                f"{key}={unet.config.get(key)}, the dense one {dense_unet.config.get(key)}")
    return unet.to(device).eval(), made_from


def _dense_loras(args) -> list:
    """The LoRAs fused into the dense model: ``--lora``, else those the slim folder was made with (its dense model
    is the source with them fused)."""
    from ..lora import LoraSpec, records_to_specs
    from ..serialization import load_plan, slim_denoiser_folder

    if args.lora:
        return [LoraSpec.parse(text) for text in args.lora]
    if (folder := slim_denoiser_folder(args.slim)) is not None:
        return records_to_specs(load_plan(folder).info.get("source_loras", []), f"slim folder {args.slim!r}")
    return []


def _starting_images(args, pipe) -> tuple:
    """The files of ``--images`` for a pipeline that starts from an image; one line for ``--images`` or
    ``--strength`` given to one that does not (text-to-image), before any sampling."""
    from ..families import family_for
    from ..families.images import calibration_images

    family = family_for(pipe)
    if not family.serving_image_inputs:
        given = [flag for flag, value in (("--images", args.images), ("--strength", args.strength))
                 if value is not None]
        if given:
            raise SlimDiffError(f"{' and '.join(given)}: {type(pipe).__name__} takes no image (only inpainting "
                                "models, FLUX Control, FLUX Kontext and the SDXL refiner take one)")
        return ()
    if args.strength is not None and not family.noises_image:
        raise SlimDiffError(f"--strength: {type(pipe).__name__} noises no image (it samples from noise, conditioned on "
                            "its images)")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise SlimDiffError(f"--strength {args.strength} is outside (0, 1]")
    return () if args.images is None else tuple(calibration_images(args.images, "--images"))


def _ensemble_base(args, refiner, dtype, device) -> tuple:
    """``(base pipeline, hand-over)`` of ``--base`` (``(None, None)`` without it), loaded and checked against the
    refiner before any sampling: one line for a model that is no refiner, a base that cannot feed it,
    ``--images``/``--strength`` beside it, or a hand-over that leaves either model no step."""
    from ..calibrate import CalibrationConfig
    from ..families import family_for
    from ..families.refiner import check_base
    from ..models import load_pipeline

    if args.base is None:
        if args.refiner_start is not None:
            raise SlimDiffError("--refiner-start is where the base model hands its latents to the refiner: give "
                                "--base too")
        return None, None
    if family_for(refiner).name != "sdxl-refiner":
        raise SlimDiffError(f"--base given, but {type(refiner).__name__} is no refiner: only the SDXL refiner is "
                            "compared after a base model")
    if args.images is not None or args.strength is not None:
        raise SlimDiffError("--base and --images/--strength: the refiner refines either the base's latents or the "
                            "images given, not both")
    start = {} if args.refiner_start is None else {"refiner_start": args.refiner_start}
    config = CalibrationConfig(steps=args.steps, **start)  # the hand-over's default and range, checked
    try:
        base = load_pipeline(args.base, dtype)
    except SlimDiffError as exc:
        raise SlimDiffError(f"--base: {exc}") from None
    check_base(base, refiner, config, args.base)
    base.set_progress_bar_config(disable=True)
    return base.to(device), config.refiner_start


def _prompts(args, proxy: bool) -> tuple[list[str], str]:
    """The evaluation prompts, and where they come from (for the report)."""
    from ..prompts import evaluation_prompts, read_prompts

    if args.num < 1:
        raise SlimDiffError(f"--num must be positive, got {args.num}")
    if args.prompts:
        return read_prompts(args.prompts, limit=args.num), args.prompts
    if proxy:
        from ..proxy.shapes import heldout_prompts

        return (heldout_prompts(args.num, seed=HELDOUT_PROMPT_SEED),
                f"proxy held-out compositions (seed {HELDOUT_PROMPT_SEED})")
    return (evaluation_prompts(args.num, seed=EVALUATION_PROMPT_SEED),
            f"PartiPrompts, packaged (a sample, seed {EVALUATION_PROMPT_SEED})")


def evaluate_to(args, folder: Path) -> dict:
    """Run the evaluation described by ``args`` and write the report files into ``folder``."""
    import torch

    from ..families import family_for
    from ..models import load_pipeline
    from . import optional
    from .evaluate import EvalSettings, adherence, compare, is_proxy, model_label, paired_delta, unet_cost
    from .metrics import fidelity, noise_error_summary
    from .report import eval_markdown, save_grid, save_images, write_json

    from ..serialization import load_plan, slim_denoiser_folder

    if args.grid < 1:
        raise SlimDiffError(f"--grid is the grid's number of columns, at least 1: got {args.grid}")
    if (given := slim_denoiser_folder(args.model)) is not None:  # the arguments swapped, most often
        origin = load_plan(given).info.get("source_model")
        raise SlimDiffError(f"--model {args.model!r} is a slim model: --model takes the dense model"
                            f"{f' (this one was slimmed from {origin})' if origin else ''}, --slim the slim one")
    start = time.perf_counter()
    device = resolve_device(args.device)
    proxy = is_proxy(args.model)
    prompts, prompt_source = _prompts(args, proxy)  # before any model loads: a bad prompt file is one line at once
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    dense = load_pipeline(args.model, dtype, loras=_dense_loras(args)).to(device)
    dense_unet = family_for(dense).denoiser(dense)
    slim_unet, made_from = _load_slim(args.slim, dense_unet, dtype, device)
    if args.adherence == "on" and not proxy:
        print("note: --adherence on with a model that is not the proxy: the analyzer reads shapes only")
    images = _starting_images(args, dense)
    base, refiner_start = _ensemble_base(args, dense, dtype, device)
    settings = EvalSettings(steps=args.steps, seed=args.seed, size=args.resolution, batch_size=args.batch_size,
                            guidance=args.guidance if args.guidance is not None else
                            (PROXY_GUIDANCE if proxy else SD_GUIDANCE), images=images, strength=args.strength,
                            **({} if base is None else {"base": base, "refiner_start": refiner_start}))
    comp = compare(dense, {"slim": slim_unet}, prompts, settings)
    drawn = {"dense": comp.dense, "slim": comp.slims["slim"]}

    metrics = {"noise_prediction_error": noise_error_summary(comp.noise_errors["slim"], comp.timesteps),
               "fidelity": fidelity(comp.dense, comp.slims["slim"]),
               "lpips": optional.lpips_distance(comp.dense, {"slim": comp.slims["slim"]}, device)}
    if args.adherence == "on" or (args.adherence == "auto" and proxy):
        metrics["adherence"] = {name: adherence(imgs, prompts) for name, imgs in drawn.items()}
        delta = paired_delta(metrics["adherence"]["dense"], metrics["adherence"]["slim"])
        metrics["adherence"]["delta_points"] = delta["points"]
        metrics["adherence"]["delta"] = delta
    else:
        metrics["adherence"] = optional.skipped("only for the proxy model (its analyzer reads shape scenes); "
                                                "use --adherence on to force")
    metrics["clip_score"] = optional.clip_score(drawn, prompts, args.clip_model, args.clip_weights, device)
    if args.save_images or args.fid_real:
        for name, imgs in drawn.items():
            save_images(folder / "images" / name, imgs)
    metrics["fid"] = optional.fid({n: folder / "images" / n for n in drawn}, args.fid_real, args.fid_weights,
                                  device)

    report = {
        "format": "slimdiff-quality/1",
        "label": model_label(args.model),
        # MACs at the family's text length (CLIP's 77 tokens; PixArt-Σ's T5: 300; SD3: 77 + 256)
        "dense": {"source": args.model, **unet_cost(dense_unet, family=family_for(dense))},
        "slim": {"source": args.slim, "made_from": made_from, **unet_cost(slim_unet, family=family_for(dense))},
        "settings": {"prompts": prompt_source,
                     "num_prompts": len(prompts), "steps": settings.steps,
                     "guidance": settings.guidance, "seeds": f"{settings.seed}..{settings.seed + len(prompts) - 1}",
                     "size": comp.dense.shape[1], "scheduler": type(dense.scheduler).__name__, "device": device,
                     "dtype": str(dtype).removeprefix("torch."), "unet_calls_per_image": len(comp.timesteps),
                     "starting_images": args.images, "strength": args.strength,
                     **({} if base is None else {"base": args.base, "refiner_start": refiner_start})},
        "metrics": metrics,
        "prompts": prompts,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(folder / "report.json", report)
    (folder / "report.md").write_text(eval_markdown(report), encoding="utf-8")
    save_grid(folder / "grid.png", [("dense", comp.dense), ("slim", comp.slims["slim"])], args.grid)
    return report


def run(args) -> None:
    from ..serialization import atomic_output_dir, commit_output_dir

    out = Path(args.out)
    tmp = atomic_output_dir(out, args.force)
    try:
        report = evaluate_to(args, tmp)
        commit_output_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = report["metrics"]
    print(f"quality report written to {out} ({report['label']})")
    print(f"  noise-prediction error (mean over steps): {m['noise_prediction_error']['mean']:.4f}")
    print(f"  PSNR {m['fidelity']['psnr_db']['mean']:.2f} dB, SSIM {m['fidelity']['ssim']['mean']:.4f}")
    if "skipped" not in m["adherence"]:
        print(f"  adherence dense {m['adherence']['dense']['score']:.3f}, slim {m['adherence']['slim']['score']:.3f}")
    for name in ("lpips", "clip_score", "fid", "adherence"):
        if "skipped" in m[name]:
            print(f"  {name}: skipped ({m[name]['skipped']})")

