"""Benchmark reports: ``report.json`` (schema-checked), ``report.md`` (tables) and PNG plots, written to a
temporary folder and renamed into place whole."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SlimDiffError
from ..serialization import atomic_output
from .harness import SCHEMA

#: The paper's "up to 35 % acceleration", read both ways: 1.35× throughput, or 35 % less latency (1/0.65).
PAPER_READINGS = {"1.35× (35 % more throughput)": 1.35, "1.54× (35 % less latency)": 1 / 0.65}

# field → allowed types; nested dicts are checked by their own table. None in a tuple allows null.
_TOP = {"schema": (str,), "created": (str,), "wall_seconds": (int, float), "command": (str,), "config": (dict,),
        "model": (dict,), "environment": (dict,), "mac_counter": (dict,), "models": (list,), "engines": (dict,),
        "results": (list,)}
_MODEL = {"source": (str,), "weights": (str,), "dtype": (str,), "resolution": (int,), "latent": (list,),
          "dense_params": (int,), "plan_source": (str,), "plan_note": (str,), "budget_unit": (str,)}
_ENV = {"machine": (dict,), "device": (dict,), "libraries": (dict,), "git": (dict,)}
_MODEL_ENTRY = {"budget": (int, float), "source": (str,), "params": (int,), "params_removed": (int,),
                "removed_by_kind": (dict,), "macs": (dict,)}
_ENGINE = {"description": (str,), "status": (str,), "reason": (str, type(None))}
_RESULT = {"engine": (str,), "budget": (int, float), "batch": (int,), "status": (str,)}
_OK_RESULT = {"unet": (dict,), "build_s": (int, float), "first_call_ms": (int, float),
              "error_vs_dense": (float, type(None)), "error_vs_eager": (float, type(None)),
              "engine_file_bytes": (int, type(None)), "weights_bytes": (int,), "memory": (dict,),
              "speedup": (float, type(None)), "ideal_speedup": (float, type(None)),
              "measured_over_ideal": (float, type(None)), "speedup_status": (str,), "noisy_reasons": (list,)}
SPEEDUP_STATUSES = ("reference", "measured", "noisy", "not-measured")
_TIMING = {"median_ms": (int, float), "p90_ms": (int, float), "mean_ms": (int, float), "n": (int,),
           "warmup": (int,), "clock": (str,)}
_E2E = {"images": (int,), "steps": (int,), "total_ms": (int, float), "unet_ms": (int, float),
        "outside_unet_ms": (int, float), "unet_calls": (int,)}
STATUSES = ("ok", "skipped", "failed")
WEIGHTS = ("seeded-random", "trained-proxy", "real")


def _check(obj, table: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise SlimDiffError(f"report: {where} must be an object")
    for key, types in table.items():
        if key not in obj:
            raise SlimDiffError(f"report: {where}.{key} is missing")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise SlimDiffError(f"report: {where}.{key} has type {type(value).__name__}, "
                                f"expected {'/'.join(t.__name__ for t in types)}")


def validate_report(report: dict) -> None:
    """Raise :class:`SlimDiffError` unless ``report`` follows the ``slimdiff-bench/1`` schema: every engine
    asked for is listed with a status, a skipped/failed one with its reason, every measured cell complete."""
    _check(report, _TOP, "report")
    if report["schema"] != SCHEMA:
        raise SlimDiffError(f"report: schema {report['schema']!r} is not {SCHEMA!r}")
    _check(report["model"], _MODEL, "model")
    if report["model"]["weights"] not in WEIGHTS:
        raise SlimDiffError(f"report: model.weights must be one of {WEIGHTS}")
    _check(report["environment"], _ENV, "environment")
    if "commit" not in report["environment"]["git"]:
        raise SlimDiffError("report: environment.git.commit is missing")
    for i, m in enumerate(report["models"]):
        _check(m, _MODEL_ENTRY, f"models[{i}]")
    for name in report["config"].get("engines", []):
        if name not in report["engines"]:
            raise SlimDiffError(f"report: engine {name!r} was asked for but is not listed")
    for name, e in report["engines"].items():
        _check(e, _ENGINE, f"engines.{name}")
        if e["status"] not in ("ok", "skipped"):
            raise SlimDiffError(f"report: engines.{name}.status must be ok or skipped")
        if e["status"] == "skipped" and not e["reason"]:
            raise SlimDiffError(f"report: skipped engine {name!r} has no reason")
    for i, r in enumerate(report["results"]):
        where = f"results[{i}]"
        _check(r, _RESULT, where)
        if r["status"] not in STATUSES:
            raise SlimDiffError(f"report: {where}.status must be one of {STATUSES}")
        if r["status"] != "ok":
            if not r.get("reason"):
                raise SlimDiffError(f"report: {where} is {r['status']} without a reason")
            continue
        _check(r, _OK_RESULT, where)
        _check(r["unet"], _TIMING, f"{where}.unet")
        if r["speedup_status"] not in SPEEDUP_STATUSES:
            raise SlimDiffError(f"report: {where}.speedup_status must be one of {SPEEDUP_STATUSES}")
        if r["speedup_status"] in ("measured", "noisy") and not (r.get("interleaved") or {}).get("interval"):
            raise SlimDiffError(f"report: {where} has a speed-up without the interleaved timing it comes from")
        if r["speedup_status"] == "noisy" and not r["noisy_reasons"]:
            raise SlimDiffError(f"report: {where} is noisy without a reason")
        if r.get("e2e") is not None:
            _check(r["e2e"], _E2E, f"{where}.e2e")


# ----------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------


def _f(value, fmt: str, missing: str = "–") -> str:
    return missing if value is None else format(value, fmt)


def speedup_text(r: dict) -> str:
    """A cell's speed-up as it may be read: with its interval, and flagged when it is noise."""
    status = r.get("speedup_status")
    if status == "reference":
        return "1 (dense)"
    interval = (r.get("interleaved") or {}).get("interval")
    if status == "not-measured" or interval is None:
        return "–"
    text = f"{interval['speedup']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"
    return f"noisy ({text})" if status == "noisy" else text


def _dense_ms(r: dict) -> float | None:
    """The dense latency the cell's speed-up is relative to: its interleaved partner, or its own (dense)."""
    paired = r.get("interleaved")
    if paired:
        return paired["dense_unet"]["median_ms"]
    return r["unet"]["median_ms"] if r["budget"] == 0 else None


def results_table(report: dict) -> str:
    """One row per measured or skipped cell (Markdown)."""
    models = {m["budget"]: m for m in report["models"]}
    head = ("| engine | budget | batch | params (M) | removed (M) | GMAC | ideal × | dense ms (interleaved) | "
            "median ms | p90 ms | speed-up × [95 % CI] | measured/ideal | err vs dense | e2e ms | outside denoiser ms "
            "| image PSNR dB vs dense | status |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(report["results"], key=lambda r: (r["engine"], r["batch"], r["budget"])):
        m = models.get(r["budget"], {})
        macs = m.get("macs", {}).get(str(r["batch"]), {}).get("total")
        if r["status"] != "ok":
            empty = " |" * 11  # ideal … image PSNR: nothing was measured
            rows.append(f"| {r['engine']} | {r['budget']:g} | {r['batch']} | {_f(m.get('params', 0) / 1e6, '.2f')} | "
                        f"{_f(m.get('params_removed', 0) / 1e6, '.2f')} | {_f(macs and macs / 1e9, '.2f')} |{empty} "
                        f"{r['status']}: {r['reason']} |")
            continue
        e2e = r.get("e2e") or {}
        noisy = "; ".join(r.get("noisy_reasons") or []) if r.get("speedup_status") == "noisy" else ""
        rows.append(
            f"| {r['engine']} | {r['budget']:g} | {r['batch']} | {m['params'] / 1e6:.2f} | "
            f"{m['params_removed'] / 1e6:.2f} | {_f(macs and macs / 1e9, '.2f')} | {_f(r['ideal_speedup'], '.3f')} | "
            f"{_f(_dense_ms(r), '.2f')} | {r['unet']['median_ms']:.2f} | {r['unet']['p90_ms']:.2f} | "
            f"{speedup_text(r)} | {_f(r['measured_over_ideal'], '.3f') if not noisy else '–'} | "
            f"{_f(r['error_vs_dense'], '.2e', 'n/a')} | {_f(e2e.get('total_ms'), '.1f')} | "
            f"{_f(e2e.get('outside_unet_ms'), '.1f')} | {_f(e2e.get('image_psnr_db_vs_dense'), '.1f', 'n/a')} | "
            f"{'noisy: ' + noisy if noisy else 'ok'} |")
    return "\n".join(rows)


def console_table(report: dict) -> str:
    """The short table the CLI prints: dense vs slim latency (interleaved), speed-up with its interval, error."""
    lines = [f"{'engine':<8} {'budget':>6} {'batch':>5} {'params M':>9} {'GMAC':>8} {'dense ms':>9} {'slim ms':>9} "
             f"{'speed-up [95% CI]':>30} {'ideal':>6} {'err vs dense':>12} {'e2e ms':>8} {'img err':>9} "
             f"{'img PSNR':>8}"]
    models = {m["budget"]: m for m in report["models"]}
    noisy = []
    for r in sorted(report["results"], key=lambda r: (r["engine"], r["batch"], r["budget"])):
        m = models[r["budget"]]
        macs = m["macs"][str(r["batch"])]["total"] / 1e9
        if r["status"] != "ok":
            lines.append(f"{r['engine']:<8} {r['budget']:>6g} {r['batch']:>5} {m['params'] / 1e6:>9.3f} "
                         f"{macs:>8.3f}  {r['status']}: {r['reason']}")
            continue
        if r.get("speedup_status") == "noisy":
            noisy.append(f"  {r['engine']} {r['budget']:g} batch {r['batch']}: " + "; ".join(r["noisy_reasons"]))
        e2e = r.get("e2e") or {}
        slim_ms = _f(r["unet"]["median_ms"], ">9.3f") if r["budget"] else "–"
        lines.append(
            f"{r['engine']:<8} {r['budget']:>6g} {r['batch']:>5} {m['params'] / 1e6:>9.3f} {macs:>8.3f} "
            f"{_f(_dense_ms(r), '>9.3f'):>9} {slim_ms:>9} {speedup_text(r):>30} "
            f"{_f(r['ideal_speedup'], '>6.3f'):>6} {_f(r['error_vs_dense'], '>12.3e', 'n/a'):>12} "
            f"{_f(e2e.get('total_ms'), '>8.1f'):>8} {_f(e2e.get('image_error_vs_dense'), '>9.2e', 'n/a'):>9} "
            f"{_f(e2e.get('image_psnr_db_vs_dense'), '>8.1f', 'n/a'):>8}")
    for name, e in report["engines"].items():
        if e["status"] == "skipped":
            lines.append(f"{name:<8} skipped: {e['reason']}")
    lines += ["", LEGEND.format(pairs=report["config"]["iters"], steps=report["config"]["e2e_steps"])]
    if noisy:
        lines += ["noisy cells (their speed-up is load on this machine, not the model — do not read it as a "
                  "result):"] + noisy
    return "\n".join(lines)


#: How to read the CLI table (printed under it), for someone who has never seen the method.
LEGEND = (
    "How to read this: slim and dense run interleaved ({pairs} alternating pairs, one process, same inputs); "
    "speed-up = median over pairs of dense ms / slim ms\n"
    "with a 95 % bootstrap interval; ideal = dense MACs / slim MACs (what a compute-bound engine could gain). "
    "'noisy' = the interval is too wide, the\n"
    "speed-up beats the ideal or more threads wanted to run than there are CPUs: load on this machine, not a "
    "result.\nerr vs dense = relative L2 error of one denoiser output (fixed input) against the dense denoiser.\n"
    "img err / img PSNR = the decoded images of a full {steps}-step sampling run (same prompt and seed) against "
    "the dense model's: the denoiser's small\n"
    "per-step errors compound along the trajectory, so they are larger than 'err vs dense' without the image "
    "having lost its content. For quality\n"
    "on many held-out prompts (PSNR/SSIM, prompt adherence) run `slimdiff eval`; the project's bar for deep "
    "plans is PSNR >= 25 dB at adherence within 2 points.\n"
    "A model of a few GMAC per call (builtin:proxy, builtin:tiny) is bound by per-operation overhead on a CPU, not "
    "by its MACs: expect speed-ups near 1 there whatever the ideal; the gains are at SD-1.5 / SDXL sizes.")


def markdown(report: dict, plots: list[str], extra: str = "") -> str:
    env, model = report["environment"], report["model"]
    dev = env["device"]
    git = env["git"]
    clocks = dev.get("clocks")
    lines = [
        f"# slimdiff latency benchmark — {model['source']}",
        "",
        f"- created {report['created']}, {report['wall_seconds']} s; command `{report['command']}`",
        f"- device: **{dev.get('name')}** ({dev['type']}, {dev.get('torch_threads')} torch threads)"
        + (f"; clocks at start SM {clocks.get('sm_mhz')} / max {clocks.get('sm_max_mhz')} MHz" if clocks else ""),
        f"- machine: {env['machine']['cpu']} × {env['machine']['cpu_count']}, {env['machine']['platform']}"
        + (f"; load average at start {env['machine']['load_average_1_5_15m'][0]:.2f}"
           if env["machine"].get("load_average_1_5_15m") else ""),
        "- libraries: " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v),
        f"- git: {git.get('commit')}{' (with uncommitted changes)' if git.get('dirty') else ''}",
        f"- weights: **{model['weights']}**; dtype {model['dtype']}; {model['resolution']}² px "
        f"(latent {model['latent'][0]}×{model['latent'][1]}); dense {model.get('denoiser', 'unet')} "
        f"{model['dense_params'] / 1e6:.2f} M params",
        f"- slim models: **{model['plan_source']}** — {model['plan_note']}",
        f"- budget = {model.get('budget_unit', 'fraction of the compressible parameters removed')}",
        f"- MACs: {report['mac_counter']['tool']}"
        + (f"; {report['mac_counter']['cpu_sdpa_patch']}" if report["mac_counter"].get("cpu_sdpa_patch") else ""),
        "",
        "## Engines",
        "",
        "| engine | status | description / reason |",
        "|---|---|---|",
    ]
    for name, e in report["engines"].items():
        lines.append(f"| {name} | {e['status']} | {e['reason'] or e['description']} |")
    denoiser = model.get("denoiser", "unet")
    lines += ["", f"## Denoiser ({denoiser}) latency per call, dense vs slim", "",
              f"{report.get('timing_method', '')}. Speed-up = median dense latency / median slim latency on the "
              "same engine and batch, timed interleaved; ideal = dense MACs / slim MACs; measured/ideal = "
              "speed-up / ideal (not given for noisy cells). Image PSNR: the decoded images of a full sampling run "
              "against the dense model's from the same seed (errors compound over the steps; quality is `slimdiff "
              "eval`'s job). End-to-end: batch/2 images under classifier-free guidance, batch images where guidance "
              f"is embedded (FLUX), {report['config']['e2e_steps']} steps, guidance {report['config']['guidance']} "
              "(denoiser batch = batch).",
              "", results_table(report), "", f"## Where the MACs are (per {denoiser} call, smallest batch measured)",
              "",
              "| budget | total G | FFN G | self-attn proj G | self-attn QKᵀ+AV G | cross-attn proj G | "
              "cross-attn QKᵀ+AV G | other G |", "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        b = sorted(m["macs"], key=int)[0]
        c = m["macs"][b]
        lines.append(f"| {m['budget']:g} (batch {b}) | {c['total'] / 1e9:.2f} | {c['ffn'] / 1e9:.2f} | "
                     f"{c['attn1_proj'] / 1e9:.2f} | {c['attn1_products'] / 1e9:.2f} | {c['attn2_proj'] / 1e9:.2f} | "
                     f"{c['attn2_products'] / 1e9:.2f} | {c['other'] / 1e9:.2f} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n" + extra


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def plot_latency_vs_removed(report: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    removed = {m["budget"]: m["params_removed"] / 1e6 for m in report["models"]}
    series: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in report["results"]:
        if r["status"] == "ok":
            series.setdefault((r["engine"], r["batch"]), []).append((removed[r["budget"]], r["unet"]["median_ms"]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (engine, batch), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{engine}, batch {batch}")
    ax.set_xlabel("parameters removed (M)")
    ax.set_ylabel(f"{report['model'].get('denoiser', 'unet')} latency per call, median (ms)")
    ax.set_title(f"{report['model']['source']} ({report['model']['weights']} weights) on "
                 f"{report['environment']['device'].get('name')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_speedups(report: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in report["results"] if r["status"] == "ok" and r["budget"] > 0 and r.get("speedup")
             and r.get("interleaved")]
    if not cells:
        return False
    budgets = sorted({r["budget"] for r in cells})
    keys = sorted({(r["engine"], r["batch"]) for r in cells})
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(budgets) * max(1, len(keys) / 3)), 4.5))
    for k, (engine, batch) in enumerate(keys):
        xs, ys, ideal, errs, noisy = [], [], [], [[], []], []
        for i, b in enumerate(budgets):
            r = next((r for r in cells if (r["engine"], r["batch"], r["budget"]) == (engine, batch, b)), None)
            if r:
                interval = r["interleaved"]["interval"]
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(r["speedup"])
                ideal.append(r["ideal_speedup"])
                errs[0].append(r["speedup"] - interval["low"])
                errs[1].append(interval["high"] - r["speedup"])
                noisy.append(r["speedup_status"] == "noisy")
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=f"{engine}, batch {batch}")
        for bar, flag in zip(bars, noisy):  # noise is drawn hollow: visible, not a result
            if flag:
                bar.set_fill(False)
                bar.set_hatch("//")
        ax.scatter(xs, ideal, marker="_", s=200, color="black", zorder=3,
                   label="ideal (MAC ratio)" if k == 0 else None)
    for (label, value), style in zip(PAPER_READINGS.items(), ("--", ":")):
        ax.axhline(value, linestyle=style, color="tab:red", linewidth=1, label=f"paper, {label}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    of = "of transformer MACs" if "MACs" in report["model"].get("budget_unit", "") else "of compressible"
    ax.set_xticks(range(len(budgets)), [f"{b:g} {of}" for b in budgets])
    ax.set_ylabel(f"{report['model'].get('denoiser', 'unet')} speed-up over dense (same engine, "
                  "interleaved;\n95 % CI; hatched = noisy)")
    ax.set_title(f"{report['model']['source']} ({report['model']['weights']} weights) on "
                 f"{report['environment']['device'].get('name')}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict, out: str | Path, overwrite: bool = False, extra_files: dict | None = None,
                 extra_markdown: str = "") -> Path:
    """Validate, then write ``report.json``, ``report.md`` (with ``extra_markdown`` appended), the plots and
    ``extra_files`` (name → text) into ``out``, which appears whole or not at all."""
    validate_report(report)
    out = Path(out)
    with atomic_output(out, overwrite, extra_files) as tmp:
        plots = []
        if plot_latency_vs_removed(report, tmp / "latency_vs_removed.png"):
            plots.append("latency_vs_removed.png")
        if plot_speedups(report, tmp / "speedup.png"):
            plots.append("speedup.png")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
        (tmp / "report.md").write_text(markdown(report, plots, extra_markdown), encoding="utf-8")
    return out
