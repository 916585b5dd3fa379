"""``slimdiff`` command line: calibrate, slim, inspect, bench, eval.

Every user error ends as one line on stderr and exit status 2; outputs are written to a temporary path and
renamed into place, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..console import run_command
from ..devices import resolve_device
from ..errors import SlimDiffError
from .arguments import (
    add_calibration_arguments,
    add_model_arguments,
    add_version_argument,
    calibration_clock,
    calibration_config_from_args,
    lora_specs,
    refuse_sampling_flags,
)


def _load(args, fuse_loras: bool = True):
    import torch

    from ..models import load_pipeline

    device = resolve_device(args.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    loras = lora_specs(args) if fuse_loras else ()
    return load_pipeline(args.model, dtype, args.config, args.variant, loras).to(device)


def _site_shards(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a count or 'auto', not {text!r}") from None


def cmd_calibrate(args) -> None:
    from ..api import collect_statistics
    from ..checks import check_resumable_dir
    from ..distributed import process_group, rank_device
    from ..prompts import read_prompts
    from ..serialization import load_plan, slim_denoiser_folder

    start = time.perf_counter()
    check_resumable_dir(args.out)
    if (folder := slim_denoiser_folder(args.model)) is not None:  # its statistics would slim nothing (see slim)
        origin = load_plan(folder).info.get("source_model")
        raise SlimDiffError(f"{args.model!r} is slim already: calibrate the dense model it was slimmed from"
                            f"{f' ({origin})' if origin else ''}; slimming takes dense models")
    config = calibration_config_from_args(args)
    pool = read_prompts(args.prompts, model=args.model)
    # Under torchrun every rank loads the model on its own device and samples its share of the prompts.
    args.device = rank_device(resolve_device(args.device))
    with process_group(args.device) as group:
        pipe = _load(args)
        # the clock foretells one two-pass run; site shards run several, each with its own progress bars
        timed = group.is_leader and args.site_shards == 1
        clock = calibration_clock("slimdiff", pipe, len(pool), args) if timed else None
        stats = collect_statistics(pipe, pool, args.num_prompts, args.out, config, on_batch=clock, group=group,
                                   site_shards=args.site_shards)
    if stats is not None:
        ranks = f" by {group.size} processes" if group.size > 1 else ""
        print(f"statistics of {stats.num_prompts} prompts × {len(stats.timesteps)} timesteps written to {args.out}"
              f"{ranks} in {time.perf_counter() - start:.1f} s")


def _slim_config(args):
    from ..slim import SlimConfig, parse_budget

    if (args.budget is None) == (args.speedup is None):
        raise SlimDiffError("give either --budget (parameters or MACs to remove) or --speedup with --latency-table")
    if args.speedup is not None and args.latency_table is None:
        raise SlimDiffError("--speedup needs --latency-table (measure one with `slimdiff bench --latency-table`)")
    budget = {} if args.budget is None else {"budget": parse_budget(args.budget)}
    return SlimConfig(**budget, budget_unit=args.budget_unit, allocator=args.allocator,
                      temperature=args.temperature, r_min=args.r_min, align=args.align,
                      exclude=tuple(args.exclude or ()), speedup=args.speedup, latency_table=args.latency_table,
                      lora_maps=args.lora_maps)


def cmd_slim(args) -> None:
    from ..api import collect_statistics
    from ..calibrate import Statistics, calibration_call
    from ..checks import check_output_dir
    from ..families import family_for
    from ..lora import check_loras, fuse_loras_onto_statistics
    from ..prompts import read_prompts
    from ..serialization import save_slim
    from ..slim import check_budget, slim_unet
    from ..slim_models import slim_class_for

    start = time.perf_counter()
    config = _slim_config(args)
    out = check_output_dir(args.out, args.force)
    if args.save_pipeline is not None:
        check_output_dir(args.save_pipeline, args.force)
    loras = lora_specs(args)
    check_loras(loras)
    stats = Statistics.load(args.stats) if args.stats else None
    prompts = None if args.stats else read_prompts(args.prompts, model=args.model)
    if args.stats:
        refuse_sampling_flags(args, "--stats gives statistics collected already")
    calibration = None if args.stats else calibration_config_from_args(args)  # its flags checked before loading
    # with statistics and LoRAs, the model is fingerprinted before and after the fusion (base statistics serve)
    pipe = _load(args, fuse_loras=stats is None)
    base_statistics = False
    if stats is not None and loras:
        stats, base_statistics = fuse_loras_onto_statistics(pipe, loras, stats)
        if base_statistics:
            print("statistics of the model without the LoRA(s): the factors are fitted to its activations "
                  "(calibrate with --lora for the fused model's own)")
    family = family_for(pipe)
    denoiser = family.denoiser(pipe)
    # before a calibration that could take hours (a MAC budget priced at the calls it will make)
    check_budget(denoiser, config, family, None if stats is not None else calibration_call(pipe, calibration))
    if stats is None:
        stats = collect_statistics(pipe, prompts, args.num_prompts, None, calibration,
                                   on_batch=calibration_clock("slimdiff", pipe, len(prompts), args))
    report = slim_unet(denoiser, stats, config, family=family)
    source = args.model if args.model.startswith("builtin:") else str(Path(args.model).resolve())
    report.plan.info["source_model"] = source
    # What it takes to load the source again (a slim folder reopens its pipeline from these).
    if args.config is not None:
        report.plan.info["source_config"] = str(Path(args.config).resolve())
    if args.variant is not None:
        report.plan.info["source_variant"] = args.variant
    if loras:  # fused again, from the same files, when the slim folder reopens its pipeline
        report.plan.info["source_loras"] = [spec.to_record() for spec in loras]
        report.plan.info["statistics_without_loras"] = base_statistics
    summary = report.summary()
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    denoiser.to(_save_dtype(args))
    save_slim(denoiser, report.plan, out, overwrite=args.force, extra_files={
        "slim_report.json": json.dumps({**summary, "relative_errors": report.relative_errors,
                                        "scores": report.scores}, indent=1)})
    if args.save_pipeline is not None:
        from ..serialization import save_slim_pipeline

        save_slim_pipeline(pipe, report.plan, args.save_pipeline, overwrite=args.force)
        print(f"slim pipeline written to {args.save_pipeline} (diffusers: DiffusionPipeline.from_pretrained, "
              f"after `from slimdiff import {slim_class_for(denoiser).__name__}`)")
    _print_summary(summary, out, type(denoiser).__name__, report.plan.info.get("latency_budget"))


def _save_dtype(args):
    import torch

    from ..sources import source_unet_dtype

    if args.save_dtype == "source":
        return source_unet_dtype(args.model, args.variant)
    return getattr(torch, args.save_dtype)


#: A latency plan taking more of the savable time than this cuts nearly every module to its floor.
DEEP_LATENCY_PLAN = 0.9


def _print_summary(summary: dict, out: Path, model: str, latency: dict | None = None) -> None:
    from ..lora_maps import MAPS_FILE

    before, after = summary["params_before"], summary["params_after"]
    print(f"slim {model} written to {out}")
    print(f"  parameters: {before / 1e6:.3f} M → {after / 1e6:.3f} M (removed {(before - after) / 1e6:.3f} M, "
          f"{100 * (before - after) / before:.1f} %)")
    for kind, removed in sorted(summary["removed_by_kind"].items()):
        print(f"    {kind:<10} removed {removed / 1e6:.3f} M")
    if latency is not None:
        share = latency["share_of_savable_time"]
        print(f"  latency: predicted {latency['predicted_speedup']:.3f}× (target {latency['target_speedup']:g}×) of "
              f"at most {latency['predicted_ceiling']:.3f}× on this table (every module at rank {latency['r_min']}): "
              f"the plan takes {100 * share:.0f} % of the time rank plans can save")
        if share > DEEP_LATENCY_PLAN:
            print("  note: a plan this close to the ceiling cuts nearly every slimmable module to its floor; check "
                  "its quality with `slimdiff eval` before serving it (README, Performance: on the trained proxy "
                  "the quality bar held at 44 % of the transformer-block MACs removed and failed at 60 %)")
    maps = out / MAPS_FILE
    if maps.is_file():
        print(f"  LoRA maps: {maps.stat().st_size / 1e6:.1f} MB ({MAPS_FILE}: pipe.load_lora_weights maps a LoRA of the "
              "dense model onto this one)")
    print(f"  wall time: {summary['wall_seconds']:.1f} s")


def cmd_inspect(args) -> None:
    from ..serialization import load_plan, slim_denoiser_folder, verify_slim_folder

    folder = slim_denoiser_folder(args.dir) or Path(args.dir)  # not slim: load_plan says so
    if folder != Path(args.dir):  # `slimdiff slim --save-pipeline`'s folder: the plan is its slim component's
        print(f"slim {folder.name} of the pipeline folder {args.dir}")
    plan = load_plan(folder)
    verify_slim_folder(folder)  # the plan alone would print fine over a truncated weights file
    rows = [(name, e.kind, e.width, e.rank, (e.rank * e.unit_params)) for name, e in plan.modules.items()]
    width = max(len(r[0]) for r in rows)
    print(f"{'module':<{width}}  {'type':<4}  {'width':>6}  {'rank':>6}  {'params kept':>12}")
    for name, kind, w, r, kept in rows:
        print(f"{name:<{width}}  {kind:<4}  {w:>6}  {r:>6}  {kept:>12,}")
    print(f"compressible parameters: {plan.compressible_params:,}; removed {plan.params_removed:,} "
          f"({100 * plan.params_removed / plan.compressible_params:.1f} %)")
    for lora in plan.info.get("source_loras", []):
        statistics = "the model's without it" if plan.info.get("statistics_without_loras") else "the fused model's"
        print(f"LoRA fused before slimming: {lora['path']} at scale {lora['scale']:g} (statistics: {statistics})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimdiff", description="Training-free slimming of diffusion denoisers (UNets, DiTs).")
    add_version_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="collect calibration statistics (resumable)")
    add_model_arguments(p)
    add_calibration_arguments(p)
    p.add_argument("--out", required=True, help="statistics directory (rerun to resume)")
    p.add_argument("--site-shards", type=_site_shards, default=1, metavar="N|auto",
                   help="collect the statistics a share of the sub-layers at a time, in N full calibration runs "
                        "(N× the sampling), when they do not fit in memory at once; auto: the fewest that fit "
                        "(default 1). The statistics equal an unsharded run's")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("slim", help="slim a denoiser (UNet, DiT) to a budget and save it as a diffusers folder")
    add_model_arguments(p)
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
                   help="also write the whole pipeline with the slim denoiser as a diffusers pipeline folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--save-dtype", default="source", choices=["source", "float32", "float16", "bfloat16"],
                   help="dtype of the saved slim denoiser (default: the dtype the source stores it in)")
    p.add_argument("--lora-maps", action="store_true",
                   help="also save what maps a LoRA of the dense model onto the slim one (lora_maps.safetensors), "
                        "so LoRAs load into it with pipe.load_lora_weights and switch without slimming again "
                        "(the FFN maps are about as large as the slim FFN down projections)")
    p.set_defaults(func=cmd_slim)

    p = sub.add_parser("inspect", help="print the rank plan of a slim folder or a slim pipeline folder")
    p.add_argument("dir", help="`slimdiff slim --out` or `--save-pipeline` folder")
    p.set_defaults(func=cmd_inspect)

    from ..bench.cli import add_parser as add_bench_parser
    from ..quality.cli import add_parser as add_eval_parser

    add_bench_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("slimdiff", args.func, args)

