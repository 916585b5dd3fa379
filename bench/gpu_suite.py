#!/usr/bin/env python3
"""The GPU suite: everything a session with a GPU runs, in one command that ends in under 9 minutes on an H100.

    # on the device machine (the GPU image has torch 2.11 + CUDA 13 but no diffusers): first, here,
    # `bash bench/gpu_wheels.sh` (puts the diffusers wheel in the git-ignored .whl/), then run with carry [".whl"]:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
    set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py 2>&1 | tee $OUT/suite.log

    # anywhere, to exercise every code path on builtin:tiny on the CPU (numbers meaningless):
    python bench/gpu_suite.py --dry-run --out /tmp/suite-dry

What it measures on ``builtin:sd15-shape`` (SD-1.5 shapes, seeded random weights — stated in every output) in
fp16 at 512²: dense and slim at 0.2/0.4/0.6 of the compressible mass (synthetic plans: the real allocator on
uniform scores), UNet batch 1 and 2 (batch 2 also end to end: 1 image, 25 steps, CFG), on eager (SDPA),
eager replayed from CUDA graphs, torch.compile (reduce-overhead: Inductor + CUDA graphs), AOTInductor and
TensorRT when importable; then the per-module latency table, the alignment sweep and the parameter- vs
latency-budget allocator comparison (eager replayed from CUDA graphs: plain eager is bound by kernel launches
on an H100 — 39 ms for the dense UNet at batch 1 and *slower* slim models in the first GPU run — so it cannot
see width).

Order and time: eager and CUDA-graph results, the table and the two studies come first (about three
minutes); then the compiled engines by priority — compile dense, compile 0.4, compile 0.6, AOTInductor dense,
AOTInductor 0.4, then the other budgets — each started only if the ``--deadline`` (default 420 s after start) leaves the time it needs
(its first build is assumed to take ``--compile-estimate``/``--aoti-estimate`` seconds, later ones what the
first took). A hard stop (``--hard-limit``, default 500 s) interrupts a build still running then, which is
reported as failed. Skipped and failed jobs are listed with their reasons.

Output (under ``$OUT/suite`` when ``$OUT`` is set, else ``--out``): report.json, report.md, the two PNG plots,
latency_table.json and suite.json — six files, within the device tool's limit of eight.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

T0 = time.perf_counter()


class HardStop(Exception):
    pass


def _log(msg: str) -> None:
    print(f"[gpu-suite {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="report folder (default: $OUT/suite, else bench-out/gpu-suite)")
    p.add_argument("--dry-run", action="store_true",
                   help="builtin:tiny on the CPU with few iterations: every code path, meaningless numbers")
    p.add_argument("--model", default=None, help="default builtin:sd15-shape (builtin:tiny with --dry-run)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    p.add_argument("--deadline", type=float, default=None,
                   help="no compiled-engine build starts later than this (s; default 420, 900 with --dry-run)")
    p.add_argument("--hard-limit", type=float, default=None,
                   help="interrupt whatever runs at this time (s; default 500, 1000 with --dry-run)")
    p.add_argument("--compile-estimate", type=float, default=90.0, help="assumed seconds of a first compile")
    p.add_argument("--aoti-estimate", type=float, default=120.0, help="assumed seconds of a first AOTI build")
    p.add_argument("--engines", default="eager,cudagraph,compile,aoti,trt")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 with --dry-run, steadier on a shared CPU)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from slimdiff.bench.harness import Bench, BenchConfig
    from slimdiff.bench.latency_table import LatencyModel, measure_latency_table, separability
    from slimdiff.bench.report import write_report
    from slimdiff.bench.studies import alignment_sweep, compare_allocators
    from slimdiff.errors import SlimDiffError

    dry = args.dry_run
    # A CPU dry run compiles slowly (minutes per model on two cores); it has no 9-minute budget to keep.
    args.deadline = args.deadline or (900.0 if dry else 420.0)
    args.hard_limit = args.hard_limit or (1000.0 if dry else 500.0)
    threads = args.threads or (1 if dry else None)
    if threads:
        torch.set_num_threads(threads)
    device = args.device or ("cpu" if dry else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; use --dry-run to exercise the suite on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "suite" if os.environ.get("OUT")
                                           else Path("bench-out") / "gpu-suite")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    budgets = [0.0, 0.4, 0.2, 0.6]  # the order is the priority of the compiled engines
    config = BenchConfig(
        model=args.model or ("builtin:tiny" if dry else "builtin:sd15-shape"), engines=engines, budgets=budgets,
        batches=[2, 1], resolution=None if dry else 512, device=device, dtype=None if dry else "float16",
        warmup=1 if dry else 3, iters=3 if dry else 20, e2e_steps=3 if dry else 25, e2e_runs=1 if dry else 3,
        deadline_s=args.deadline,
        build_estimates_s={"compile": args.compile_estimate, "aoti": args.aoti_estimate, "trt": 240.0},
        command=" ".join(["python3 bench/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    # A build still running at the hard limit is interrupted: the harness records it as failed and skips
    # the rest, so the reports are still written in time.
    def stop(signum, frame):
        raise HardStop(f"interrupted at the suite's {args.hard_limit:.0f} s hard limit")

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(args.hard_limit - (time.perf_counter() - T0))))
    suite: dict = {"dry_run": dry, "phases": {}}
    table = None
    try:
        bench = Bench(config, log=_log)
        bench.t0 = T0  # deadlines count from the start of this process
        phase = time.perf_counter()
        bench.prepare()
        first = [e for e in ("eager", "cudagraph") if e in engines]
        bench.run_engines(first)
        suite["phases"]["eager_s"] = round(time.perf_counter() - phase, 1)

        unet, latent, dtype = bench.pipe.unet, bench.latent, bench.dtype
        reference = "cudagraph" if "cudagraph" in first and device.startswith("cuda") else "eager"
        suite["studies_engine"] = reference
        n = dict(warmup=1 if dry else 3, iters=3 if dry else 20)

        def latency_table():
            nonlocal table
            table = measure_latency_table(unet, latent, batch=2, device=device, dtype=dtype, align=8,
                                          max_points=4 if dry else 6, log=_log, **n)
            suite["latency_table_separability"] = separability(table)
            model = LatencyModel(table, unet, latent)
            suite["latency_table_check"] = [
                {"budget": m.budget,
                 "predicted_ms": model.predict_ms({k: e.rank for k, e in m.plan.modules.items()})
                 if m.plan else model.dense_ms,
                 "measured_ms": next((r["unet"]["median_ms"] for r in bench.results if r["engine"] == reference
                                      and r["budget"] == m.budget and r["batch"] == 2 and r["status"] == "ok"),
                                     None)}
                for m in bench.models]

        def alignment():
            suite["alignment"] = alignment_sweep(unet, latent, 0.4, batch=2, device=device, log=_log, **n)

        def allocators():
            if table is None:
                raise RuntimeError("no latency table")
            suite["allocators"] = compare_allocators(unet, table, latent, 0.4, batch=2, device=device, log=_log,
                                                     **n)

        # A study that fails is recorded as failed; the engines and the reports still run.
        for name, study in (("latency_table", latency_table), ("alignment", alignment),
                            ("allocators", allocators)):
            phase = time.perf_counter()
            try:
                study()
            except HardStop:
                raise
            except Exception as exc:  # noqa: BLE001 — reported, never hidden
                suite.setdefault("failed_studies", {})[name] = f"{type(exc).__name__}: {exc}"
                _log(f"study {name} failed: {type(exc).__name__}: {exc}")
            suite["phases"][f"{name}_s"] = round(time.perf_counter() - phase, 1)

        phase = time.perf_counter()
        order = [("compile", 0.0), ("compile", 0.4), ("compile", 0.6), ("aoti", 0.0), ("aoti", 0.4),
                 ("trt", 0.0), ("trt", 0.4)]
        if dry:  # exercise the slim model through every engine first: that is where a dry run finds bugs
            order = [("compile", 0.4), ("aoti", 0.4), ("trt", 0.4)] + order
        bench.run_engines([e for e in engines if e not in first], order=order)
        suite["phases"]["compiled_engines_s"] = round(time.perf_counter() - phase, 1)
    except HardStop as exc:
        # Reached only when the stop lands outside a measured job (jobs catch it themselves).
        suite["interrupted"] = str(exc)
        _log(str(exc))
    finally:
        signal.alarm(0)
    report = bench.report()
    suite["wall_s"] = round(time.perf_counter() - T0, 1)
    files = {"suite.json": json.dumps(suite, indent=1, default=str)}
    if table is not None:
        files["latency_table.json"] = json.dumps(table, indent=1)
    try:
        write_report(report, out, overwrite=args.force or bool(os.environ.get("OUT")), extra_files=files,
                     extra_markdown=suite_markdown(suite))
    except SlimDiffError as exc:
        print(f"gpu_suite: error: {exc}", file=sys.stderr)
        return 2
    _log(f"reports written to {out}")
    print(Path(out, "report.md").read_text())
    return 0


def _ms(t) -> str:
    return "–" if not t else f"{t['median_ms']:.2f}"


def suite_markdown(suite: dict) -> str:
    engine = suite.get("studies_engine", "eager")
    lines = ["", f"## GPU suite studies ({engine}, UNet batch 2)", ""]
    if suite.get("interrupted"):
        lines += [f"**Interrupted:** {suite['interrupted']}", ""]
    for name, reason in suite.get("failed_studies", {}).items():
        lines += [f"**Study {name} failed:** {reason}", ""]
    if suite.get("latency_table_check"):
        lines += ["### Latency table: predicted vs measured UNet latency", "",
                  "| budget | predicted ms | measured ms |", "|---|---|---|"]
        for c in suite["latency_table_check"]:
            lines.append(f"| {c['budget']:g} | {c['predicted_ms']:.2f} | "
                         f"{'–' if c['measured_ms'] is None else format(c['measured_ms'], '.2f')} |")
        worst = max(suite.get("latency_table_separability", {}).values(), default=None)
        if worst is not None:
            lines += ["", f"Largest gap between a measured attention latency and an additive q·k + v model: "
                          f"{100 * worst:.0f} % (why the table keeps a 2-D grid)."]
    if suite.get("alignment"):
        a = suite["alignment"]
        lines += ["", f"### Alignment sweep at {a['budget']:g} of the compressible mass "
                      f"(dense {_ms(a['dense'])} ms)", "",
                  "| variant | params removed (M) | stored params removed (M) | GMAC | median ms | p90 ms | speed-up "
                  "| head widths (q·k, v) | FFN widths |", "|---|---|---|---|---|---|---|---|---|"]
        for v in a["variants"]:
            lines.append(f"| {v['variant']} | {v['params_removed'] / 1e6:.2f} | {v['stored_params_removed'] / 1e6:.2f}"
                         f" | {v['gmac']:.1f} | {_ms(v['unet'])} | {v['unet']['p90_ms']:.2f} | {v['speedup']:.3f} | "
                         f"{v['head_widths_qk_v']} | {v['ffn_widths']} |")
    if suite.get("allocators"):
        c = suite["allocators"]
        lines += ["", f"### Parameter budget vs latency budget (target = the parameter plan's measured "
                      f"{c['target_speedup']:.3f}×; error: {c['error_proxy']})", "",
                  "| allocator | params removed (M) | predicted error | predicted × | measured ms | measured × |",
                  "|---|---|---|---|---|---|"]
        for name in ("param_allocator", "latency_allocator"):
            e = c.get(name)
            if e:
                lines.append(f"| {name.split('_')[0]} | {e['params_removed'] / 1e6:.2f} | {e['predicted_error']:.3f} | "
                             f"{e['predicted_speedup']:.3f} | {_ms(e['unet'])} | {e['measured_speedup']:.3f} |")
        if c.get("note"):
            lines += ["", f"Note: {c['note']}"]
    lines += ["", "Phase times (s): " + ", ".join(f"{k} {v}" for k, v in suite.get("phases", {}).items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
