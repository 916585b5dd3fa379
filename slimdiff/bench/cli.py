"""``slimdiff bench``: dense vs slim denoiser latency (UNets and DiTs) on one or more engines, with a report folder.

Wiring into the main CLI::

    from .bench.cli import add_parser as add_bench_parser
    add_bench_parser(sub)            # registers "bench" with set_defaults(func=run)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from ..errors import SlimDiffError
from ..hub_cache import resolve_model_source


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SlimDiffError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise SlimDiffError(f"{what}: no value given")
    return values


def _ints(text: str, what: str) -> list[int]:
    values = _floats(text, what)
    if any(v != int(v) for v in values):
        raise SlimDiffError(f"{what}: {text!r} must be whole numbers")
    return [int(v) for v in values]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .engines import names

    p.add_argument("--model", required=True, type=resolve_model_source,
                   help="builtin:tiny, builtin:tiny-xl, builtin:sd15-shape, builtin:sdxl-shape, "
                        "builtin:tiny-xl-refiner, builtin:sdxl-refiner-shape, builtin:tiny-pixart, "
                        "builtin:pixart-sigma-shape, builtin:tiny-sd3, builtin:sd3-medium-shape, a diffusers pipeline "
                        "folder, a .safetensors checkpoint; or a slim folder (`slimdiff slim`, also --save-pipeline), "
                        "timed against the model it was slimmed from, or a slimdiff-export folder, its dense source, "
                        "slim denoiser and engines: these are timed as they are, nothing calibrated or built again")
    p.add_argument("--engines", default="eager", help=f"comma-separated, from {','.join(names())} (default eager)")
    p.add_argument("--budgets", default=None,
                   help="fractions of the compressible mass to remove; 0 = dense (default 0,0.4; with "
                        "--macs-only 0,0.2,0.4,0.6)")
    p.add_argument("--budget-unit", default="params", choices=["params", "macs"],
                   help="budgets are fractions of the compressible parameters (default) or of the transformer-block "
                        "MACs of one denoiser call at the resolution that ranks can remove (the ideal speed-up is the "
                        "ratio of the counted MACs)")
    p.add_argument("--batch", default="1,2", help="denoiser batch sizes (default 1,2); even sizes also run end to "
                                                  "end with batch/2 images under classifier-free guidance (FLUX: "
                                                  "every size, batch images: its guidance is embedded)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default fp16 on cuda, fp32 on cpu)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--iters", type=int, default=20, help="timed denoiser calls (default 20)")
    p.add_argument("--steps", type=int, default=25, help="end-to-end sampling steps (default 25)")
    p.add_argument("--e2e-runs", type=int, default=3, help="timed end-to-end runs after one warm-up (default 3)")
    p.add_argument("--no-e2e", action="store_true", help="skip end-to-end pipeline runs")
    p.add_argument("--guidance", type=float, default=7.5)
    calib = p.add_mutually_exclusive_group()
    calib.add_argument("--stats", default=None, help="calibration statistics folder: slim models are real")
    calib.add_argument("--calib-prompts", type=int, default=None,
                       help="calibrate this many SlimSet prompts first (real slim models and errors); 0 = "
                            "synthetic plans (uniform scores, seeded weights: latency only). Default: 8 for "
                            "builtin:tiny and builtin:proxy, 0 otherwise")
    p.add_argument("--calib-steps", type=int, default=10, help="sampling steps per calibration prompt (default 10)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="with --calib-prompts, for inpainting models, FLUX Control, FLUX Kontext and the SDXL "
                        "refiner: the images calibration fills holes in, conditions on, edits or refines (as "
                        "`slimdiff slim --images`)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --images: their pipeline's strength (as `slimdiff slim --strength`)")
    p.add_argument("--base", default=None, metavar="MODEL", type=resolve_model_source,
                   help="with --calib-prompts, for the SDXL refiner instead of --images: the SDXL base whose latents "
                        "calibration refines, as in diffusers' ensemble of expert denoisers (as `slimdiff slim "
                        "--base`)")
    p.add_argument("--refiner-start", type=float, default=None, metavar="F",
                   help="with --base: where the base hands its latents to the refiner (default 0.8, as `slimdiff "
                        "slim --refiner-start`)")
    p.add_argument("--align", type=int, default=8, help="ranks are multiples of this (default 8)")
    p.add_argument("--r-min", type=int, default=8)
    p.add_argument("--pad-heads", type=int, default=None, metavar="MULTIPLE",
                   help="zero-pad slim attention heads to equal q·k and v widths, a multiple of this (exact; "
                        "unequal widths push SDPA off its flash kernel)")
    p.add_argument("--allocator", default="greedy", choices=["greedy", "softmax", "uniform"],
                   help="rank allocator of calibrated slim models (default greedy, as `slimdiff slim`)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default reduce-overhead on cuda, default on cpu)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds; engine builds that would end later are skipped and reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="report folder (report.json, report.md, PNG plots)")
    p.add_argument("--force", action="store_true", help="replace an existing report folder")
    p.add_argument("--json", action="store_true", help="print the report JSON instead of the table")
    p.add_argument("--latency-table", default=None, metavar="JSON",
                   help="only measure the per-module latency table (FFN / self- / cross-attention at each level and "
                        "width, eager, first --batch size) on this device and save it: the latency-budget "
                        "allocator's input")
    p.add_argument("--macs-only", action="store_true",
                   help="only count parameters, MACs and ideal speed-ups of synthetic plans (meta device, no "
                        "weights, no timing; seconds even for SD-1.5 on a CPU)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the main CLI's sub-parsers; the handler is ``args.func = run``."""
    p = subparsers.add_parser("bench", help="latency of dense vs slim denoisers on eager/compile/ort/aoti/trt engines")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _model_source(model: str) -> str:
    """A built-in's name, or a path resolved (the report records it)."""
    return model if model.startswith("builtin:") else str(Path(model).resolve())


def config_from_args(args):
    from .engines import parse_engines
    from .harness import BenchConfig, brings_models

    given = brings_models(args.model)  # its own dense and slim models: no budgets, no calibration by default
    calib = args.calib_prompts
    if calib is None:
        calib = 0 if args.stats or given or args.model not in ("builtin:tiny", "builtin:proxy") else 8
    budgets = _floats(args.budgets or ("0" if given else "0,0.4"), "--budgets")
    return BenchConfig(
        model=args.model, engines=parse_engines(args.engines), budgets=budgets,
        budget_unit=args.budget_unit,
        batches=_ints(args.batch, "--batch"), resolution=args.resolution, device=args.device, dtype=args.dtype,
        warmup=args.warmup, iters=args.iters, e2e=not args.no_e2e, e2e_steps=args.steps, e2e_runs=args.e2e_runs,
        guidance=args.guidance, stats=args.stats, calib_prompts=calib, calib_steps=args.calib_steps,
        calib_images=None if args.images is None else str(Path(args.images).resolve()), calib_strength=args.strength,
        calib_base=None if args.base is None else _model_source(args.base), calib_refiner_start=args.refiner_start,
        align=args.align, r_min=args.r_min, pad_heads=args.pad_heads, allocator=args.allocator, seed=args.seed,
        compile_mode=args.compile_mode, deadline_s=args.deadline,
        command=_command_line(),
    )


def _command_line() -> str:
    import shlex
    from pathlib import Path

    program = "python -m slimdiff.bench" if Path(sys.argv[0]).name == "__main__.py" else Path(sys.argv[0]).name
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def run_macs_only(args) -> None:
    from ..serialization import load_plan, slim_denoiser_folder
    from .macs import counter_notes, ideal_table
    from .memory import latent_size, pipeline_family, unet_config

    config = unet_config(args.model)
    if config is None:
        raise SlimDiffError(f"--macs-only needs a built-in model or a diffusers folder with a UNet config; "
                            f"found none at {args.model!r}")
    latent = latent_size(args.model, config, args.resolution)
    slim_folder = slim_denoiser_folder(args.model)  # its own plan is counted, against the dense shapes it came from
    given = load_plan(slim_folder) if slim_folder is not None else None
    budgets = _floats(args.budgets or ("0" if given else "0,0.2,0.4,0.6"), "--budgets")
    family = pipeline_family(args.model, config)
    rows = ideal_table(config, budgets, _ints(args.batch, "--batch"), latent,
                       align=args.align, r_min=args.r_min, unit=args.budget_unit, family=family, given=given)
    dense = next((r["macs"] for r in rows if r["budget"] == 0), None)
    share = dense["transformer"] / dense["total"] if dense else None
    unit = "transformer-block MACs" if args.budget_unit == "macs" else "compressible parameters"
    plans = f"synthetic: the real allocator on uniform scores; budgets are fractions of the {unit}"
    if given is not None:
        plans += (f"; rows with plan 'given': the plan of {slim_folder} (budget: the fraction of the compressible "
                  "parameters it removed)")
    body = {"schema": "slimdiff-macs/1", "model": args.model, "family": family.name, "latent": list(latent),
            "align": args.align, "r_min": args.r_min, "plans": plans,
            "budget_unit": args.budget_unit, "transformer_share": share,
            "weights": "shapes only (meta device): no weights are built or read",
            "mac_counter": counter_notes(), "rows": rows}
    if args.json:
        print(json.dumps(body, indent=1))
    else:
        synthetic = (f"synthetic plans (uniform scores), budgets = fractions of the {unit}, align {args.align}"
                     if any(b > 0 for b in budgets) else "dense")
        print(f"{args.model}, latent {latent[0]}×{latent[1]}, {synthetic}; shapes only (meta device)")
        if given is not None:
            print(f"marked 'this folder': the plan of {slim_folder}, against the dense shapes it was slimmed from")
        if share is not None:
            print(f"transformer blocks (FFNs and attentions; 'self': self- or joint attention): {100 * share:.1f} % "
                  f"of the dense denoiser's {dense['total'] / 1e9:.1f} GMAC per call at batch {rows[0]['batch']}")
        print(f"{'budget':>6} {'batch':>5} {'params M':>9} {'removed M':>9} {'GMAC':>9} {'FFN':>7} {'self proj':>9} "
              f"{'self QK/AV':>10} {'cross':>7} {'other':>8} {'ideal ×':>8}")
        for r in rows:
            m = r["macs"]
            print(f"{r['budget']:>6g} {r['batch']:>5} {r['params'] / 1e6:>9.2f} {r['params_removed'] / 1e6:>9.2f} "
                  f"{m['total'] / 1e9:>9.2f} {m['ffn'] / 1e9:>7.2f} {m['attn1_proj'] / 1e9:>9.2f} "
                  f"{m['attn1_products'] / 1e9:>10.2f} {(m['attn2_proj'] + m['attn2_products']) / 1e9:>7.2f} "
                  f"{m['other'] / 1e9:>8.2f} {r['ideal_speedup']:>8.3f}" + ("  this folder" if r["plan"] == "given"
                                                                              else ""))
    if args.out:
        from pathlib import Path

        from ..serialization import atomic_output_dir, commit_output_dir

        tmp = atomic_output_dir(Path(args.out), args.force)
        (tmp / "macs.json").write_text(json.dumps(body, indent=1), encoding="utf-8")
        commit_output_dir(tmp, Path(args.out))


def run_latency_table(args) -> None:
    import torch

    from ..devices import resolve_device
    from .harness import _resolve_dtype
    from .latency_table import measure_latency_table, save_table, separability, time_breakdown
    from ..families import family_for
    from ..models import load_pipeline

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device = resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, dtype).to(device)
    family = family_for(pipe)
    denoiser = family.denoiser(pipe)
    factor = pipe.vae_scale_factor
    size = (args.resolution or family.sample_size(denoiser.config)[0] * factor) // factor
    batch = _ints(args.batch, "--batch")[0]
    table = measure_latency_table(denoiser, (size, size), batch, device=device, dtype=dtype, align=args.align,
                                  warmup=args.warmup, iters=args.iters, family=family,
                                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    table["model"] = args.model
    save_table(table, args.latency_table)
    gaps = separability(table)  # of the attentions with a q·k × v grid (none where q·k is normalised per head)
    print(f"latency table of {args.model} ({table['dtype']}, batch {batch}, latent {size}×{size}) on "
          f"{table['device'].get('name')}: {len(table['groups'])} module groups, dense denoiser "
          f"{table['dense_unet_ms']:.2f} ms; written to {args.latency_table}")
    if gaps:
        print("largest gap between measured attention latency and an additive q·k + v model: "
              f"{100 * max(gaps.values()):.0f} %")
    rows = time_breakdown(table)
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kind → [dense ms, ms at the floor]
    for r in rows:
        by_kind[r["kind"]][0] += r["dense_ms"]
        by_kind[r["kind"]][1] += r["smallest_ms"]
    dense = table["dense_unet_ms"]
    floor = sum(r["smallest_ms"] for r in rows)
    parts = [f"{kind} {100 * d / dense:.0f} % (→ {100 * m / dense:.0f} % at the smallest ranks)"
             for kind, (d, m) in by_kind.items() if kind != "rest"]
    if by_kind["rest"][0] < 0:  # isolated timings cannot add up to more than the whole call on a quiet machine
        print(f"the sub-layers timed alone add up to {100 * (1 - by_kind['rest'][0] / dense):.0f} % of the dense "
              "call: the timings are noisy (a busy machine?) — measure again before slimming to a latency budget")
        return
    print("where the time goes (sub-layers timed alone): " + ", ".join(parts)
          + f", outside the slimmable sub-layers {100 * by_kind['rest'][0] / dense:.0f} %; "
          f"no rank plan is predicted faster than {dense / floor:.2f}×")


def run(args) -> None:
    """Run the benchmark the parsed ``args`` describe; print the table; write the report when ``--out``."""
    from ..checks import check_output_dir, check_output_file

    if args.out:  # before any measurement: a report that cannot be written would waste the run
        check_output_dir(args.out, args.force)
    if args.latency_table:
        check_output_file(args.latency_table)
    if args.macs_only:
        return run_macs_only(args)
    if args.latency_table:
        return run_latency_table(args)

    from .harness import run_bench
    from .report import console_table, validate_report, write_report

    config = config_from_args(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise SlimDiffError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    report = run_bench(config)
    validate_report(report)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        model = report["model"]
        print(f"{model['source']} ({model['weights']} weights, {model['dtype']}, {model['resolution']}² px) on "
              f"{report['environment']['device'].get('name')}; slim models: {model['plan_source']}; budget = "
              f"{model['budget_unit']}")
        print(console_table(report))
    if args.out:
        write_report(report, args.out, overwrite=args.force)
        print(f"report written to {args.out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from ..console import run_command

    parser = argparse.ArgumentParser(prog="slimdiff bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command("slimdiff bench", run, parser.parse_args(argv))
