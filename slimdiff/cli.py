"""``slimdiff`` command line: calibrate, slim, inspect, bench, eval.

Every user error ends as one line on stderr and exit status 2; outputs are written to a temporary path and
renamed into place, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .devices import resolve_device
from .errors import SlimDiffError


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="builtin:tiny, builtin:tiny-xl, builtin:sd15-shape, builtin:sdxl-shape, a diffusers pipeline "
                        "folder (SD or SDXL) or a .safetensors checkpoint")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="for a single-file .safetensors checkpoint: a diffusers folder with its configuration "
                        "(default: the shipped SD-1.x / SD-2.x configuration matching the checkpoint)")
    p.add_argument("--variant", default=None,
                   help="weight variant of a pipeline folder, e.g. fp16 (default: the plain files, or the only "
                        "variant present)")


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=None,
                   help="prompt pool: .txt, .csv/.tsv with a prompt column, or COCO captions JSON "
                        "(default: the packaged COCO val2017 captions)")
    p.add_argument("--num-prompts", type=int, default=500, help="SlimSet size (default 500)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps per prompt (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
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
    from .calibrate import CalibrationConfig

    return CalibrationConfig(steps=args.steps, guidance_scale=args.guidance, height=args.resolution,
                             width=args.resolution, seed=args.seed, batch_size=args.batch_size,
                             pass1_prompts=args.pass1_prompts, weighting=args.weighting,
                             checkpoint_every=args.checkpoint_every)


def calibration_clock(prog: str, pipe, pool_size: int, args):
    """On a CPU, the callback that says how long calibration will take (measured on the first prompts)."""
    from .estimate import CalibrationClock

    if pipe.unet.device.type != "cpu":
        return None
    return CalibrationClock(prog, min(args.num_prompts, pool_size), args.pass1_prompts, args.batch_size)


def _load(args):
    import torch

    from .models import load_pipeline

    device = resolve_device(args.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    return load_pipeline(args.model, dtype, args.config, args.variant).to(device)


def cmd_calibrate(args) -> None:
    from .api import collect_statistics
    from .checks import check_resumable_dir
    from .distributed import process_group, rank_device
    from .prompts import read_prompts

    start = time.perf_counter()
    check_resumable_dir(args.out)
    config = calibration_config_from_args(args)
    pool = read_prompts(args.prompts, model=args.model)
    # Under torchrun every rank loads the model on its own device and samples its share of the prompts.
    args.device = rank_device(resolve_device(args.device))
    with process_group(args.device) as group:
        pipe = _load(args)
        clock = calibration_clock("slimdiff", pipe, len(pool), args) if group.is_leader else None
        stats = collect_statistics(pipe, pool, args.num_prompts, args.out, config, on_batch=clock, group=group)
    if stats is not None:
        ranks = f" by {group.size} processes" if group.size > 1 else ""
        print(f"statistics of {stats.num_prompts} prompts × {len(stats.timesteps)} timesteps written to {args.out}"
              f"{ranks} in {time.perf_counter() - start:.1f} s")


def _slim_config(args):
    from .slim import SlimConfig, parse_budget

    if (args.budget is None) == (args.speedup is None):
        raise SlimDiffError("give either --budget (parameters or MACs to remove) or --speedup with --latency-table")
    if args.speedup is not None and args.latency_table is None:
        raise SlimDiffError("--speedup needs --latency-table (measure one with `slimdiff bench --latency-table`)")
    budget = {} if args.budget is None else {"budget": parse_budget(args.budget)}
    return SlimConfig(**budget, budget_unit=args.budget_unit, allocator=args.allocator,
                      temperature=args.temperature, r_min=args.r_min, align=args.align,
                      exclude=tuple(args.exclude or ()), speedup=args.speedup, latency_table=args.latency_table)


def cmd_slim(args) -> None:
    from .api import collect_statistics
    from .calibrate import Statistics
    from .checks import check_output_dir
    from .prompts import read_prompts
    from .serialization import save_slim
    from .slim import check_budget, slim_unet

    start = time.perf_counter()
    config = _slim_config(args)
    out = check_output_dir(args.out, args.force)
    if args.save_pipeline is not None:
        check_output_dir(args.save_pipeline, args.force)
    stats = Statistics.load(args.stats) if args.stats else None
    prompts = None if args.stats else read_prompts(args.prompts, model=args.model)
    pipe = _load(args)
    check_budget(pipe.unet, config)  # before a calibration that could take hours
    if stats is None:
        stats = collect_statistics(pipe, prompts, args.num_prompts, None, calibration_config_from_args(args),
                                   on_batch=calibration_clock("slimdiff", pipe, len(prompts), args))
    report = slim_unet(pipe.unet, stats, config)
    source = args.model if args.model.startswith("builtin:") else str(Path(args.model).resolve())
    report.plan.info["source_model"] = source
    summary = report.summary()
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    pipe.unet.to(_save_dtype(args))
    save_slim(pipe.unet, report.plan, out, overwrite=args.force, extra_files={
        "slim_report.json": json.dumps({**summary, "relative_errors": report.relative_errors,
                                        "scores": report.scores}, indent=1)})
    if args.save_pipeline is not None:
        from .serialization import save_slim_pipeline

        save_slim_pipeline(pipe, report.plan, args.save_pipeline, overwrite=args.force)
        print(f"slim pipeline written to {args.save_pipeline} (diffusers: DiffusionPipeline.from_pretrained, "
              "after `from slimdiff import SlimUNet2DConditionModel`)")
    _print_summary(summary, out)


def _save_dtype(args):
    import torch

    from .sources import source_unet_dtype

    if args.save_dtype == "source":
        return source_unet_dtype(args.model, args.variant)
    return getattr(torch, args.save_dtype)


def _print_summary(summary: dict, out: Path) -> None:
    before, after = summary["params_before"], summary["params_after"]
    print(f"slim UNet written to {out}")
    print(f"  parameters: {before / 1e6:.3f} M → {after / 1e6:.3f} M (removed {(before - after) / 1e6:.3f} M, "
          f"{100 * (before - after) / before:.1f} %)")
    for kind, removed in sorted(summary["removed_by_kind"].items()):
        print(f"    {kind:<10} removed {removed / 1e6:.3f} M")
    print(f"  wall time: {summary['wall_seconds']:.1f} s")


def cmd_inspect(args) -> None:
    from .checks import verify_slim_folder
    from .serialization import load_plan

    plan = load_plan(args.dir)
    verify_slim_folder(args.dir)  # the plan alone would print fine over a truncated weights file
    rows = [(name, e.kind, e.width, e.rank, (e.rank * e.unit_params)) for name, e in plan.modules.items()]
    width = max(len(r[0]) for r in rows)
    print(f"{'module':<{width}}  {'type':<4}  {'width':>6}  {'rank':>6}  {'params kept':>12}")
    for name, kind, w, r, kept in rows:
        print(f"{name:<{width}}  {kind:<4}  {w:>6}  {r:>6}  {kept:>12,}")
    print(f"compressible parameters: {plan.compressible_params:,}; removed {plan.params_removed:,} "
          f"({100 * plan.params_removed / plan.compressible_params:.1f} %)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimdiff", description="Training-free slimming of diffusion UNets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="collect calibration statistics (resumable)")
    _add_model(p)
    add_calibration_arguments(p)
    p.add_argument("--out", required=True, help="statistics directory (rerun to resume)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("slim", help="slim a UNet to a budget and save it as a diffusers folder")
    _add_model(p)
    add_calibration_arguments(p)
    p.add_argument("--stats", default=None, help="statistics directory from `slimdiff calibrate`")
    p.add_argument("--budget", default=None,
                   help="fraction of the compressible mass (0.4) or an amount to remove (100M)")
    p.add_argument("--speedup", type=float, default=None,
                   help="instead of --budget: the UNet speed-up to reach (e.g. 1.1), predicted from --latency-table")
    p.add_argument("--latency-table", default=None, metavar="JSON",
                   help="per-module latency table measured on the target GPU (`slimdiff bench --latency-table`)")
    p.add_argument("--budget-unit", default="params", choices=["params", "macs"])
    p.add_argument("--allocator", default="greedy", choices=["greedy", "softmax", "uniform"],
                   help="greedy on the closed-form error curves (default), the entropic softmax of the paper, "
                        "or one keep-ratio for all")
    p.add_argument("--temperature", type=float, default=None,
                   help="ε: how strongly module scores weigh (softmax: the entropy temperature, default 0.1; "
                        "greedy: error increases weighted by exp(score/ε), default ∞ = error curves alone)")
    p.add_argument("--r-min", type=int, default=8)
    p.add_argument("--align", type=int, default=8, help="ranks are multiples of this (default 8)")
    p.add_argument("--exclude", nargs="*", help="module fragments or kinds (ffn, qk, vo, attn1, attn2) to keep")
    p.add_argument("--out", required=True)
    p.add_argument("--save-pipeline", metavar="DIR",
                   help="also write the whole pipeline with the slim UNet as a diffusers pipeline folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--save-dtype", default="source", choices=["source", "float32", "float16", "bfloat16"],
                   help="dtype of the saved slim UNet (default: the dtype the source model's UNet is stored in)")
    p.set_defaults(func=cmd_slim)

    p = sub.add_parser("inspect", help="print the rank plan of a slim folder")
    p.add_argument("dir")
    p.set_defaults(func=cmd_inspect)

    from .bench.cli import add_parser as add_bench_parser
    from .quality.cli import add_parser as add_eval_parser

    add_bench_parser(sub)
    add_eval_parser(sub)
    return parser


def run_command(prog: str, func, args) -> int:
    """Run one command; a user error or an interrupt becomes one line on stderr and an exit status."""
    from .console import Terminated, one_line_warnings, sigterm_as_interrupt

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for a hub
    try:
        with sigterm_as_interrupt(), one_line_warnings(prog):
            func(args)
    except SlimDiffError as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (disk full, permissions): no traceback, outputs cleaned up
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("slimdiff", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
