#!/usr/bin/env python3
"""The GPU suite (issue 12 §2): SDXL at 1024² first, deadline-driven, one call of at most ~8 minutes.

    # on the device machine (the GPU image has torch + CUDA but no diffusers): first, here,
    # `bash bench/gpu_wheels.sh` (puts the diffusers wheel in the git-ignored .whl/), then run with carry [".whl"]:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
    set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py 2>&1 | tee $OUT/suite.log

    # anywhere, every phase on tiny models on the CPU in about a minute (numbers meaningless):
    python bench/gpu_suite.py --dry-run --out /tmp/suite-dry

Phases, in priority order (each is skipped, with its reason, when the deadline leaves it too little time; the
partial report — ``suite.json`` — is rewritten after every phase, so a killed run still leaves what it measured):

1. **Headline.** ``builtin:sdxl-shape`` (seeded random weights, exact SDXL-base shapes; ``builtin:sd15-shape``
   at 512² until the SDXL model exists in the checkout — the report says which ran), fp16, 1024², UNet batch 2
   (classifier-free guidance) and 1: dense vs slim, slim timed *interleaved* with dense (speed-up = median of
   the pair ratios with a bootstrap interval; noisy cells flagged), on ``cudagraph`` (eager replayed from CUDA graphs) —
   plans removing 40 % and 60 % of the transformer-block MACs (synthetic: the real allocator on uniform scores)
   and then latency-budget plans at ``--speedup`` 1.3 and 1.5 (the table of phase 2 predicts them); then on
   ``compile`` (Inductor, reduce-overhead) in the order dense, 1.5×, 60 %, 40 %, 1.3×. Ideal (MAC ratio) next
   to measured.
2. **Latency table** of the headline model at its resolution, batch 2 (committed so ``slimdiff slim --speedup``
   works on this GPU), with its predicted ceiling (every module at its smallest rank); it runs between the
   cudagraph MAC plans and the latency-budget plans that need it.
3. **Attention kernels** per slim head shape of the 60 % plan: the SDPA backend PyTorch dispatches to at native
   widths (q·k width ≠ v width leaves the flash kernel) and zero-padded to equal widths / 64-buckets, SDPA
   latency of each (interleaved), and the largest output difference (exactness check).
9. **Attention core** (run right after phase 3, seconds): per dense attention shape, SDPA alone at the native head
   width, at rank 8 and with half the heads at rank 8 — what the core keeps where rank plans stop (the H200 run
   of 2026-12-04 found the attention sub-layers at 70 % of their time there), and the ceiling half the heads
   would give instead of the rank plans' (slimdiff drops no heads: a measurement for deciding whether to).
4. **Compiled SD-1.5**: ``builtin:sd15-shape`` fp16 512² batch 2, dense vs 0.4 on compile and AOTInductor.
5. **Calibration on CUDA**: a measured subset of calibration on the headline model and on SD-1.5, extrapolated to
   500 prompts × 25 steps, with peak GPU and host memory (SDXL samples 10 steps to spend less device time: its
   float64 statistics are 17.8 GB there and 21.0 GB over 25 timesteps, held once on the host; both are reported).
8. **SDXL refiner** (run after phase 5, before the DiTs): ``builtin:sdxl-refiner-shape`` (seeded random weights,
   exact SDXL-refiner 1.0 UNet) fp16 1024², UNet batch 2, dense vs plans removing 40 % and 60 % of its
   transformer-block MACs (65.6 % of its MACs; ideal 1.36× / 1.65×), interleaved on the headline engines.
6. **SD3-medium** (a DiT, through the same harness): ``builtin:sd3-medium-shape`` (seeded random weights, exact
   shapes) fp16 1024², transformer batch 2, dense vs plans removing 33 % and 50 % of the transformer-block MACs,
   interleaved on the headline engines (cudagraph, compile). Last in priority: it runs only if the deadline leaves
   it time (``--skip 3,4,5`` gives it theirs); building the seeded T5-XXL it encodes its prompt with takes a while.
7. **FLUX.1-dev** (after SD3, only when time is left): ``builtin:flux-dev-shape`` (seeded random weights, exact
   FLUX.1-dev transformer: 19 double- and 38 single-stream blocks, 11.9 B parameters) fp16 1024² (4,096 image + 512
   T5 tokens), transformer batch 1 (guidance is embedded: no classifier-free batch), dense vs plans removing 33 % and
   50 % of the transformer-block MACs, interleaved on the headline engines. Building the seeded transformer and
   T5-XXL on the host takes minutes: it needs the most time of any phase.

Output (``$OUT/suite`` when ``$OUT`` is set, else ``--out``): report.md (headline tables and every phase),
report.json (the headline benchmark, schema ``slimdiff-bench/1``), suite.json (every phase; rewritten after each),
latency_table.json, speedup.png and latency_vs_removed.png — six files, within the device tool's limit of eight.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

T0 = time.perf_counter()
MAC_FRACTIONS = (0.4, 0.6)  # of the transformer-block MACs (issue 12 §2.1)
SPEEDUPS = (1.3, 1.5)  # latency-budget plans
CALIBRATION_TARGET = (500, 25)  # prompts × steps the measured subset is extrapolated to
DIT_MAC_FRACTIONS = (0.33, 0.5)  # of the SD3 transformer-block MACs (phase 6) and of FLUX.1-dev's (phase 7)
REFINER_MAC_FRACTIONS = MAC_FRACTIONS  # of the SDXL refiner's transformer-block MACs (phase 8), as the headline's


class HardStop(Exception):
    pass


def _log(msg: str) -> None:
    print(f"[gpu-suite {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _listed(kind):
    """An argparse type: a comma-separated list of ``kind`` (empty: none); argparse names the option on a bad item."""
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item.strip()]

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse's message: "invalid comma-separated int value"
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="report folder (default: $OUT/suite, else bench-out/gpu-suite)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny models on the CPU, few iterations: every phase and code path, meaningless numbers")
    p.add_argument("--model", default=None,
                   help="headline model (default builtin:sdxl-shape when it exists, else builtin:sd15-shape; "
                        "builtin:tiny-xl or builtin:tiny with --dry-run)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after start by which every phase must have ended (default 450; 600 dry run)")
    p.add_argument("--hard-limit", type=float, default=None,
                   help="interrupt whatever runs at this time (s; default 480; 900 dry run)")
    p.add_argument("--compile-estimate", type=float, default=120.0,
                   help="assumed seconds of a first compile of the headline model")
    p.add_argument("--engines", default=None,
                   help="headline engines (default cudagraph,compile; eager,compile with --dry-run)")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out (2-9), e.g. 4,5")
    p.add_argument("--batches", type=_listed(int), default=[2, 1],
                   help="headline denoiser batches (default 2,1: CFG first)")
    p.add_argument("--mac-fractions", type=_listed(float), default=list(MAC_FRACTIONS),
                   help="headline plans removing these fractions of the transformer-block MACs (empty: none)")
    p.add_argument("--speedups", type=_listed(float), default=list(SPEEDUPS),
                   help="headline latency-budget plans (--speedup targets; empty: none)")
    p.add_argument("--latency-table", default=None,
                   help="a latency table this GPU measured before (an earlier suite's latency_table.json): phase 2 "
                        "is not measured again and the latency-budget plans use it — for a rerun that spends its "
                        "device time on the compiled engine")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 with --dry-run)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def _default_model(dry: bool) -> str:
    from slimdiff.models import BUILTINS

    for name in (("builtin:tiny-xl", "builtin:tiny") if dry else ("builtin:sdxl-shape", "builtin:sd15-shape")):
        if name in BUILTINS:
            return name
    raise RuntimeError("no built-in model for the suite")


class Suite:
    """Phases with a shared deadline; ``suite.json`` is rewritten after each one."""

    def __init__(self, args, out: Path):
        self.args, self.out = args, out
        self.body: dict = {"schema": "slimdiff-gpu-suite/2", "dry_run": args.dry_run, "phases": {},
                           "command": " ".join(["python3 bench/gpu_suite.py", *sys.argv[1:]])}
        self.tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.deadline - (time.perf_counter() - T0)

    def phase(self, key: str, title: str, need_s: float, fn) -> None:
        """Run ``fn`` as a phase if the deadline leaves ``need_s`` seconds; record ok / skipped / failed."""
        entry = {"title": title}
        self.body["phases"][key] = entry
        if key[1] in self.args.skip_phases:  # "p3_…" is phase 3
            entry.update(status="skipped", reason="left out with --skip")
        elif self.left() < need_s:
            entry.update(status="skipped", reason=f"the deadline leaves {max(self.left(), 0):.0f} s; this phase "
                                                  f"needs ~{need_s:.0f} s")
        else:
            started = time.perf_counter()
            try:
                entry["result"] = fn()
                entry["status"] = "ok"
            except HardStop as exc:
                entry.update(status="failed", reason=str(exc))
                self.save()
                raise
            except Exception as exc:  # noqa: BLE001 — a failed phase is reported; the others still run
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                entry.update(status="failed", reason=f"{type(exc).__name__}: {first}")
            entry["seconds"] = round(time.perf_counter() - started, 1)
        _log(f"phase {key}: {entry['status']}" + (f" — {entry['reason']}" if entry.get("reason") else ""))
        self.save()

    def save(self) -> None:
        """The partial report: written to a temporary name and renamed, so a reader never sees half a file."""
        self.body["wall_s"] = round(time.perf_counter() - T0, 1)
        path = self.tmp / "suite.json"
        part = path.with_suffix(".json.part")
        part.write_text(json.dumps(self.body, indent=1, default=str), encoding="utf-8")
        os.replace(part, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from slimdiff.errors import SlimDiffError

    dry = args.dry_run
    args.deadline = args.deadline or (600.0 if dry else 450.0)
    args.hard_limit = args.hard_limit or (900.0 if dry else 480.0)
    args.skip_phases = {s.strip() for s in args.skip.split(",") if s.strip()}
    threads = args.threads or (1 if dry else None)
    if threads:
        torch.set_num_threads(threads)
    device = args.device or ("cpu" if dry else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; use --dry-run to exercise the suite on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "suite" if os.environ.get("OUT")
                                           else Path("bench-out") / "gpu-suite")
    if out.exists() and not (args.force or os.environ.get("OUT")):
        print(f"gpu_suite: error: {out} exists (use --force)", file=sys.stderr)
        return 2
    state: dict = {}
    if args.latency_table:  # read before anything is written or built, so that a wrong path fails at once
        from slimdiff.latency import load_table

        try:
            state["table"] = load_table(args.latency_table)
        except SlimDiffError as exc:
            print(f"gpu_suite: error: {exc}", file=sys.stderr)
            return 2
    suite = Suite(args, out)

    def stop(signum, frame):
        raise HardStop(f"interrupted at the suite's {args.hard_limit:.0f} s hard limit")

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(args.hard_limit - (time.perf_counter() - T0))))
    try:
        run_phases(suite, state, args, device, dry)
    except HardStop as exc:
        suite.body["interrupted"] = str(exc)
        _log(str(exc))
    finally:
        signal.alarm(0)
    try:
        write_outputs(suite, state, out, args)
    except SlimDiffError as exc:
        print(f"gpu_suite: error: {exc}", file=sys.stderr)
        return 2
    _log(f"reports written to {out}")
    print(Path(out, "report.md").read_text())
    return 0


def run_phases(suite: Suite, state: dict, args, device: str, dry: bool) -> None:
    from slimdiff.bench.harness import Bench, BenchConfig
    from slimdiff.bench.plans import SYNTHETIC, SlimModel, seeded_slim_copy

    model = args.model or _default_model(dry)
    sdxl = "xl" in model
    engines = [e.strip() for e in (args.engines or ("eager,compile" if dry else "cudagraph,compile")).split(",")
               if e.strip()]
    timed = [e for e in engines if e != "compile"]
    n = dict(warmup=1 if dry else 3, iters=3 if dry else 20)
    resolution = None if dry else (1024 if sdxl else 512)
    suite.body["headline"] = {"model": model, "engines": engines, "resolution": resolution or "model default",
                              "dtype": "float32" if dry else "float16", "batches": args.batches,
                              "note": None if sdxl or dry else "builtin:sdxl-shape is not in this checkout: the "
                              "headline ran on SD-1.5 shapes at 512²"}
    config = BenchConfig(model=model, engines=engines, budgets=[0.0], batches=args.batches, resolution=resolution,
                         device=device, dtype=None if dry else "float16", e2e=False, deadline_s=args.deadline,
                         build_estimates_s={"compile": args.compile_estimate}, command=suite.body["command"], **n)
    bench = Bench(config, log=_log)
    bench.t0 = T0  # deadlines count from the start of this process
    state["bench"] = bench
    labels: dict[float, str] = {}

    def add_plan(plan, label: str, info: dict) -> float:
        key = round(plan.params_removed / plan.compressible_params, 6)
        while key in labels or key == 0:
            key += 1e-6  # distinct plans with equal parameter fractions still get distinct keys
        labels[key] = label
        slim = seeded_slim_copy(bench.pipe.unet, plan, 0)
        bench.add_models([SlimModel(slim, key, plan, SYNTHETIC, {"label": label, **info})])
        return key

    def headline_mac_plans():
        from slimdiff.bench.plans import transformer_mac_plan
        from slimdiff.bench.studies import transformer_macs_removed

        bench.prepare()
        result = {}
        for fraction in args.mac_fractions:
            plan = transformer_mac_plan(bench.pipe.unet, fraction, bench.latent)
            got = transformer_macs_removed(bench.pipe.unet, plan, bench.latent, batch=2)
            key = add_plan(plan, f"transformer MACs −{100 * fraction:.0f} %", {"transformer_macs_removed": got})
            result[labels[key]] = {"key": key, "transformer_macs_removed": got}
        bench.run_engines(timed, keep_dense=True)
        return result

    def latency_table():
        from slimdiff.bench.latency_table import LatencyModel, measure_latency_table, separability, time_breakdown

        unet = bench.pipe.unet
        table = measure_latency_table(unet, bench.latent, batch=2, device=device, dtype=bench.dtype, align=8,
                                      max_points=4 if dry else 6, log=_log, **n)
        table["model"] = model
        state["table"] = table
        latency = LatencyModel(table, unet, bench.latent)
        floor = {s.name: min(s.width, 8) for s in _sites(unet)}
        checks = []
        for m in bench.models:
            measured = next((r["unet"]["median_ms"] for r in bench.results if r["engine"] == timed[0]
                             and r["budget"] == m.budget and r["batch"] == 2 and r["status"] == "ok"), None)
            ranks = {k: e.rank for k, e in m.plan.modules.items()} if m.plan else None
            checks.append({"plan": labels.get(m.budget, "dense"), "measured_ms": measured,
                           "predicted_ms": latency.predict_ms(ranks) if ranks else latency.dense_ms})
        return {"dense_ms": latency.dense_ms, "predicted_ceiling": latency.predict_speedup(floor),
                "ceiling_means": "every compressible module at its smallest rank (8), the rest of the UNet as is",
                "separability": separability(table), "predicted_vs_measured": checks,
                "time_breakdown": time_breakdown(table)}

    def latency_plans():
        from slimdiff.bench.latency_table import LatencyModel, latency_budget_ranks, proxy_items
        from slimdiff.plan import RankPlan

        if "table" not in state:
            raise RuntimeError("no latency table (phase 2 did not run)")
        unet = bench.pipe.unet
        latency = LatencyModel(state["table"], unet, bench.latent)
        result, before = {}, len(bench.models)
        for target in args.speedups:
            try:
                ranks, info = latency_budget_ranks(proxy_items(unet), latency, target, r_min=8, align=8)
            except Exception as exc:  # noqa: BLE001 — an unreachable target is a finding, not a crash
                result[f"--speedup {target}"] = {"status": "unreachable", "reason": str(exc)}
                continue
            plan = RankPlan.from_ranks(_sites(unet), ranks, info={"source": SYNTHETIC, **info})
            key = add_plan(plan, f"--speedup {target}", {"latency_plan": info})
            result[labels[key]] = {"key": key, "predicted_speedup": info["predicted_speedup"]}
        bench.run_engines(timed, budgets=[m.budget for m in bench.models[before:]], keep_dense=True)
        return result

    def compiled_headline():
        if "compile" not in engines:
            return {"note": "compile not among --engines"}
        by_label = {v: k for k, v in labels.items()}
        wanted = ["dense", "--speedup 1.5", "transformer MACs −60 %", "transformer MACs −40 %", "--speedup 1.3"]
        order = [("compile", 0.0 if w == "dense" else by_label[w]) for w in wanted if w == "dense" or w in by_label]
        bench.release_dense()  # the timed engines are done: free their dense models before compiling
        bench.run_engines(["compile"], order=order)
        return {"order": wanted}

    def attention_kernels():
        from slimdiff.bench.studies import attention_backend_study

        by_label = {v: k for k, v in labels.items()}
        key = by_label.get("transformer MACs −60 %")
        slim = next(m.unet for m in bench.models if m.budget == key) if key else seeded_slim_copy(
            bench.pipe.unet, _mac_plan(bench, 0.6), 0)
        return {"plan": "transformer MACs −60 %", "shapes": attention_backend_study(
            slim, bench.latent, batch=2, device=device, log=_log, **n)}

    def attention_core():
        from slimdiff.bench.latency_table import time_breakdown
        from slimdiff.bench.studies import attention_core_study

        floor = 8  # the rank plans' r_min
        rows = attention_core_study(bench.pipe.unet, bench.latent, batch=2, device=device, floor=floor, log=_log, **n)
        result = {"floor": floor, "shapes": rows,
                  "core_at_floor_ms": sum(r["modules"] * r["floor_ms"] for r in rows),
                  "half_heads_saving_ms": sum(r["modules"] * (r["floor_ms"] - r["half_heads_floor_ms"]) for r in rows)}
        if "table" in state:  # the ceiling of rank plans, and what half the heads at the floor would move it to
            dense = state["table"]["dense_unet_ms"]
            floor_ms = sum(r["smallest_ms"] for r in time_breakdown(state["table"]))
            result["predicted_ceiling"] = dense / floor_ms
            result["predicted_ceiling_half_heads"] = dense / (floor_ms - result["half_heads_saving_ms"])
        return result

    def compiled_sd15():
        sd15 = "builtin:tiny" if dry else "builtin:sd15-shape"
        cfg = BenchConfig(model=sd15, engines=["compile", "aoti"], budgets=[0.0, 0.4], batches=[2],
                          resolution=None if dry else 512, device=device, dtype=None if dry else "float16",
                          e2e=False, deadline_s=args.deadline,
                          build_estimates_s={"compile": 60.0, "aoti": 120.0}, command=suite.body["command"], **n)
        sd = Bench(cfg, log=_log)
        sd.t0 = T0
        state["sd15"] = sd
        sd.prepare()
        sd.run_engines(["compile", "aoti"], order=[("compile", 0.0), ("compile", 0.4), ("aoti", 0.0),
                                                   ("aoti", 0.4)])
        report = sd.report()
        return {"model": sd15, "results": [_cell_summary(r) for r in report["results"]]}

    def calibration():
        out = {}
        for name in dict.fromkeys([model, "builtin:tiny" if dry else "builtin:sd15-shape"]):
            out[name] = _calibration_subset(name, device, dry)
        return out

    def mac_plans(key: str, model: str, batch: int, resolution: int | None,
                  fractions: tuple[float, ...] = DIT_MAC_FRACTIONS) -> dict:
        """A further model's denoiser (a DiT's transformer, the refiner's UNet), dense vs plans removing
        ``fractions`` of its transformer-block MACs, interleaved on the headline engines."""
        cfg = BenchConfig(model=model, engines=engines, budgets=[0.0, *fractions], budget_unit="macs",
                          batches=[batch], resolution=resolution, device=device,
                          dtype=None if dry else "float16", e2e=False, deadline_s=args.deadline,
                          build_estimates_s={"compile": args.compile_estimate}, command=suite.body["command"], **n)
        dit_bench = Bench(cfg, log=_log)
        dit_bench.t0 = T0
        state[key] = dit_bench
        dit_bench.prepare()
        dit_bench.run_engines(engines)
        report = dit_bench.report()
        return {"model": model, "resolution": report["model"]["resolution"], "dtype": report["model"]["dtype"],
                "batch": batch, "budget_unit": report["model"]["budget_unit"],
                "results": [_cell_summary(r) for r in report["results"]]}

    def sdxl_refiner():
        return mac_plans("refiner", "builtin:tiny-xl-refiner" if dry else "builtin:sdxl-refiner-shape", 2,
                         None if dry else 1024, REFINER_MAC_FRACTIONS)

    def sd3_medium():
        state.pop("refiner", None)  # the refiner's models are not timed again
        _free_memory(device)
        return mac_plans("sd3", "builtin:tiny-sd3" if dry else "builtin:sd3-medium-shape", 2, None if dry else 1024)

    def flux_dev():
        state.pop("sd3", None)  # the SD3 models are not timed again: room for FLUX's 11.9 B parameters and copies
        _free_memory(device)
        # tiny-flux at 32 px in the dry run: FluxPipeline's default size is 1024 px (4,096 tokens) for any FLUX
        return mac_plans("flux", "builtin:tiny-flux" if dry else "builtin:flux-dev-shape", 1, 32 if dry else 1024)

    est = args.compile_estimate
    suite.phase("p1a_headline_mac_plans", "headline: transformer-MAC plans on the timed engines", 30,
                headline_mac_plans)
    if suite.body["phases"]["p1a_headline_mac_plans"]["status"] != "ok":
        return  # without the headline model nothing else is worth the device time
    if "table" in state:
        suite.body["phases"]["p2_latency_table"] = {
            "title": "per-module latency table and predicted ceiling", "status": "skipped",
            "reason": f"not measured again: the latency-budget plans use {args.latency_table}"}
    else:
        suite.phase("p2_latency_table", "per-module latency table and predicted ceiling", 40, latency_table)
    suite.phase("p1b_latency_plans", "headline: latency-budget plans (--speedup "
                + " / ".join(f"{t:g}" for t in args.speedups) + ")", 20, latency_plans)
    # The compiled headline may take what is left except a reserve for the short phases after it, if any run.
    reserve = 0.0 if {"3", "4", "5"} <= args.skip_phases else 90.0
    deadline = args.deadline
    bench.cfg.deadline_s = deadline - reserve
    suite.phase("p1c_compiled_headline", "headline: dense vs slim on torch.compile (reduce-overhead)",
                est + reserve, compiled_headline)
    bench.cfg.deadline_s = deadline
    suite.phase("p3_attention_kernels", "SDPA backend per slim head shape, zero-padding", 20, attention_kernels)
    suite.phase("p9_attention_core", "attention core alone: native, at rank 8, half the heads at rank 8", 20,
                attention_core)
    suite.phase("p4_compiled_sd15", "compiled SD-1.5 slim and AOTInductor, dense vs 0.4", 150, compiled_sd15)
    suite.phase("p5_calibration", "calibration on CUDA, extrapolated to 500 × 25", 60, calibration)
    bench.release_dense()  # the headline's dense runners (CUDA graph pools) are not timed again
    suite.phase("p8_sdxl_refiner", "SDXL refiner UNet: dense vs 40 % / 60 % of its block MACs", 30 if dry else 120,
                sdxl_refiner)
    suite.phase("p6_sd3_medium", "SD3-medium transformer: dense vs 33 % / 50 % of its block MACs",
                30 if dry else 240, sd3_medium)
    suite.phase("p7_flux_dev", "FLUX.1-dev transformer: dense vs 33 % / 50 % of its block MACs",
                30 if dry else 360, flux_dev)


def _free_memory(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _sites(unet):
    from slimdiff.models import module_sites

    return module_sites(unet)


def _mac_plan(bench, fraction):
    from slimdiff.bench.plans import transformer_mac_plan

    return transformer_mac_plan(bench.pipe.unet, fraction, bench.latent)


def _cells_table(cells: list[dict]) -> list[str]:
    """Markdown rows of :func:`_cell_summary` cells: dense vs slim with the speed-up's interval."""
    lines = ["| engine | budget | dense ms | slim ms | speed-up | ideal | status |", "|---|---|---|---|---|---|---|"]
    for c in cells:
        dense, slim = (c.get("median_ms"), None) if c["budget"] == 0 else (c.get("dense_median_ms"), c.get("median_ms"))
        lines.append(f"| {c['engine']} | {c['budget']:g} | {_f(dense)} | {_f(slim)} | {_f(c.get('speedup'), '.3f')}"
                     f"{' [' + ', '.join(f'{x:.3f}' for x in c['interval']) + ']' if c.get('interval') else ''}"
                     f" | {_f(c.get('ideal_speedup'), '.3f')} | {c.get('speedup_status') or c['status']} |")
    return lines


def _cell_summary(r: dict) -> dict:
    keep = ("engine", "budget", "batch", "status", "reason", "speedup", "ideal_speedup", "speedup_status",
            "noisy_reasons", "build_s")
    cell = {k: r[k] for k in keep if k in r}
    if r["status"] == "ok":
        cell["median_ms"] = r["unet"]["median_ms"]
        if r.get("interleaved"):
            cell["dense_median_ms"] = r["interleaved"]["dense_unet"]["median_ms"]
            cell["interval"] = [r["interleaved"]["interval"]["low"], r["interleaved"]["interval"]["high"]]
    return cell


def _calibration_subset(model: str, device: str, dry: bool) -> dict:
    """Calibrate a few prompts (pass 1 and pass 2), time both passes, extrapolate to 500 × 25."""
    import torch

    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.models import load_pipeline
    from slimdiff.prompts import read_prompts

    cuda = device.startswith("cuda")
    from slimdiff.calibrate import statistics_bytes

    # SDXL's subset samples 10 steps to spend less device time: time is extrapolated per prompt-step; its float64
    # statistics are 17.8 GB at 10 steps and 21.0 GB at 25 (only the per-timestep Grams grow), stated per step count.
    prompts, steps = (2, 2) if dry else (8, 10 if "xl" in model else 25)
    pipe = load_pipeline(model, torch.float32 if dry else torch.float16).to(device)
    pipe.set_progress_bar_config(disable=True)
    config = CalibrationConfig(steps=steps, batch_size=1 if dry else 4, pass1_prompts=prompts)
    marks: dict[str, list[float]] = {"pass1": [], "pass2": []}
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def on_batch(stage: str, done: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        marks[stage].append(time.perf_counter())

    t0 = time.perf_counter()
    calibrate(pipe, read_prompts(limit=prompts), None, config, progress=False, on_batch=on_batch)
    pass1 = marks["pass1"][-1] - t0
    pass2 = marks["pass2"][-1] - marks["pass1"][-1]
    target_prompts, target_steps = CALIBRATION_TARGET
    # Pass 1 runs on min(64, N) prompts, pass 2 on all N; costs scale per prompt-step.
    projected = (pass1 / (prompts * steps) * min(64, target_prompts)
                 + pass2 / (prompts * steps) * target_prompts) * target_steps
    result = {"measured_prompts": prompts, "steps": steps, "pass1_s": round(pass1, 2), "pass2_s": round(pass2, 2),
              "projected_500x25_s": round(projected, 1), "projected_500x25_gpu_min": round(projected / 60, 2),
              "peak_gpu_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
              "peak_host_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
              "target_minutes": 30 if "xl" in model else 10,
              "statistics_bytes": {str(n): sum(statistics_bytes(pipe.unet, n).values())
                                   for n in sorted({steps, CALIBRATION_TARGET[1]})}}
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    return result


def write_outputs(suite: Suite, state: dict, out: Path, args) -> None:
    from slimdiff.bench.report import markdown, plot_latency_vs_removed, plot_speedups, validate_report
    from slimdiff.serialization import commit_output_dir

    bench = state.get("bench")
    report = None
    if bench is not None and hasattr(bench, "engine_entries"):
        for name in bench.cfg.engines:  # an engine whose phase never ran is listed with the reason
            bench.engine_entries.setdefault(name, {"description": name, "status": "skipped",
                                                   "reason": "its suite phase did not run (see the phase table)"})
        report = bench.report()
        validate_report(report)
        suite.body["headline"]["cells"] = [_cell_summary(r) for r in report["results"]]
    suite.save()
    tmp = suite.tmp
    plots = []
    if report is not None:
        if plot_latency_vs_removed(report, tmp / "latency_vs_removed.png"):
            plots.append("latency_vs_removed.png")
        if plot_speedups(report, tmp / "speedup.png"):
            plots.append("speedup.png")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    if state.get("table"):
        (tmp / "latency_table.json").write_text(json.dumps(state["table"], indent=1), encoding="utf-8")
    text = suite_markdown(suite.body, report)
    if report is not None:
        text = markdown(report, plots, text)
    (tmp / "report.md").write_text(text, encoding="utf-8")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    commit_output_dir(tmp, out)


def _f(v, fmt=".2f", missing="–"):
    return missing if v is None else format(v, fmt)


def suite_markdown(body: dict, report: dict | None) -> str:
    head = body.get("headline", {})
    lines = ["", "## GPU suite (issue 12 §2)", ""]
    if body.get("dry_run"):
        lines += ["> **Dry run** (tiny models, CPU, a few iterations): every phase and code path ran; the numbers "
                  "mean nothing.", ""]
    if head.get("note"):
        lines += [f"**Note:** {head['note']}", ""]
    if body.get("interrupted"):
        lines += [f"**Interrupted:** {body['interrupted']}", ""]
    lines += ["| phase | status | seconds | reason |", "|---|---|---|---|"]
    for key, p in body["phases"].items():
        lines.append(f"| {key}: {p['title']} | {p['status']} | {p.get('seconds', '–')} | {p.get('reason', '')} |")
    if report is not None:
        labels = {m["budget"]: m.get("label") or ("dense" if m["budget"] == 0 else f"{m['budget']:g}")
                  for m in report["models"]}
        lines += ["", "### Headline: dense vs slim (interleaved; speed-up with 95 % interval)", "",
                  "| engine | batch | plan | dense ms | slim ms | speed-up [95 % CI] | ideal | status |",
                  "|---|---|---|---|---|---|---|---|"]
        from slimdiff.bench.report import speedup_text

        for r in sorted(report["results"], key=lambda r: (r["engine"], r["batch"], r["budget"])):
            if r["budget"] == 0:
                continue
            if r["status"] != "ok":
                lines.append(f"| {r['engine']} | {r['batch']} | {labels[r['budget']]} | | | | | {r['status']}: "
                             f"{r['reason']} |")
                continue
            paired = r.get("interleaved") or {}
            lines.append(f"| {r['engine']} | {r['batch']} | {labels[r['budget']]} | "
                         f"{_f(paired.get('dense_unet', {}).get('median_ms'))} | {r['unet']['median_ms']:.2f} | "
                         f"{speedup_text(r)} | {_f(r['ideal_speedup'], '.3f')} | {r['speedup_status']} |")
    table = body["phases"].get("p2_latency_table", {}).get("result")
    if table:
        lines += ["", f"### Latency table: dense {table['dense_ms']:.2f} ms, predicted ceiling "
                      f"{table['predicted_ceiling']:.3f}× ({table['ceiling_means']})", "",
                  "| plan | predicted ms | measured ms |", "|---|---|---|"]
        for c in table["predicted_vs_measured"]:
            lines.append(f"| {c['plan']} | {_f(c['predicted_ms'])} | {_f(c['measured_ms'])} |")
        lines += ["", "Where the time goes (each slimmable sub-layer timed alone, summed per group; the rest is the "
                      "dense call minus those sums):", "",
                  "| group | sub-layers | dense ms | share | ms at the smallest rank |", "|---|---|---|---|---|"]
        for r in table.get("time_breakdown", []):
            lines.append(f"| {r['group']} | {r['sublayers'] or '–'} | {r['dense_ms']:.2f} | "
                         f"{100 * r['dense_share']:.1f} % | {r['smallest_ms']:.2f} |")
    attn = body["phases"].get("p3_attention_kernels", {}).get("result")
    if attn:
        lines += ["", f"### Attention kernels per slim head shape ({attn['plan']})", "",
                  "| heads | q·k | v | tokens q→k | modules | native backend | padded to | padded backend | "
                  "padding speed-up [95 % CI] | max abs diff |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in attn["shapes"]:
            for p in s["padded"] or [None]:
                pad, backend, gain, diff = "–", "–", "–", "–"
                if p is not None:
                    iv = p["speedup_of_padding"]
                    pad, backend, diff = p["width"], p["backend"], f"{p['max_abs_diff']:.2e}"
                    gain = f"{iv['speedup']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
                lines.append(f"| {s['heads']} | {s['qk_width']} | {s['v_width']} | {s['query_tokens']}→"
                             f"{s['key_tokens']} | {s['modules']} | {s['native']['backend']} | {pad} | {backend} | "
                             f"{gain} | {diff} |")
    core = body["phases"].get("p9_attention_core", {}).get("result")
    if core:
        lines += ["", "### Attention core alone (SDPA, batch 2, timed eagerly and interleaved)", "",
                  f"At width {core['floor']} the cores still take {core['core_at_floor_ms']:.2f} ms a call; half the "
                  f"heads at that width would save {core['half_heads_saving_ms']:.2f} ms"
                  + (f" (rank-plan ceiling {core['predicted_ceiling']:.3f}× → "
                     f"{core['predicted_ceiling_half_heads']:.3f}× with half the heads; slimdiff does not drop heads)"
                     if "predicted_ceiling" in core else "")
                  + ".", "",
                  "| heads × width | tokens q→k | modules | native ms | at the floor ms | half the heads ms |",
                  "|---|---|---|---|---|---|"]
        for r in core["shapes"]:
            lines.append(f"| {r['heads']} × {r['width']} | {r['query_tokens']}→{r['key_tokens']} | {r['modules']} | "
                         f"{r['native_ms']:.3f} | {r['floor_ms']:.3f} | {r['half_heads_floor_ms']:.3f} |")
    sd = body["phases"].get("p4_compiled_sd15", {}).get("result")
    if sd:
        lines += ["", f"### Compiled {sd['model']} (batch 2)", ""] + _cells_table(sd["results"])
    for key, part in (("p8_sdxl_refiner", "UNet"), ("p6_sd3_medium", "transformer"), ("p7_flux_dev", "transformer")):
        r = body["phases"].get(key, {}).get("result")
        if r:
            lines += ["", f"### {r['model']} {part} ({r['dtype']}, {r['resolution']}², batch {r['batch']}; budget = "
                          f"{r['budget_unit']})", ""] + _cells_table(r["results"])
    cal = body["phases"].get("p5_calibration", {}).get("result")
    if cal:
        lines += ["", "### Calibration, measured subset extrapolated to 500 prompts × 25 steps", "",
                  "| model | measured | projected GPU-min | target | peak GPU GiB | peak host GiB |",
                  "|---|---|---|---|---|---|"]
        for name, c in cal.items():
            gpu = c["peak_gpu_bytes"]
            lines.append(f"| {name} | {c['measured_prompts']} × {c['steps']} | {c['projected_500x25_gpu_min']} | "
                         f"≤ {c['target_minutes']} | {_f(gpu and gpu / 2**30)} | "
                         f"{c['peak_host_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
