"""The latency benchmark: dense vs slim UNets on the same engines, UNet-only and end-to-end.

For every engine that can run here, every budget (0 = dense) and every UNet batch size it measures the UNet
call (warm-ups, then timed calls: median and p90) — a slim model *interleaved* with the dense model on the same
engine (alternating calls in one process, same inputs, same threads), its speed-up the median of the per-pair
ratios dense/slim with a bootstrap confidence interval, and the cell marked *noisy* when that interval is wide,
the speed-up beats the ideal by more than a few percent or the machine was busy (:mod:`.timing`) — the error
of the engine's output against the dense eager model on the same inputs, MACs and parameters
(``torch.utils.flop_counter``), the ideal speed-up (dense MACs / slim MACs) and the measured/ideal ratio, peak
memory and engine file size. At even UNet batch
sizes it also runs the whole pipeline (``batch/2`` images with classifier-free guidance, so the UNet sees the
same shape) and splits its latency into time inside and outside the UNet.

Cells are run in priority order — eager first, then the other engines budget by budget in the order given —
and a ``deadline_s`` skips (and reports) the cells that would not finish in time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import SlimDiffError
from . import engines as engine_registry
from .env import device_info, git_commit, library_versions, machine_info, weights_kind
from .macs import count_macs, counter_notes, meta_unet
from .memory import check_fits
from .plans import CALIBRATED, SYNTHETIC, SlimModel, make_models
from .timing import (NOISY_MAX_RELATIVE_WIDTH, NOISY_OVER_IDEAL, CallTimer, PeakMemory, clock_name, is_cuda,
                     judge_speedup, load_average, speedup_interval, summarize, time_calls, time_interleaved,
                     wall_clock)

SCHEMA = "slimdiff-bench/1"
BUDGET_UNITS = {"params": "fraction of the compressible parameters removed",
                "macs": "fraction of the transformer-block MACs of one UNet call removed"}
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon"


@dataclass
class BenchConfig:
    model: str
    engines: list[str] = field(default_factory=lambda: ["eager"])
    budgets: list[float] = field(default_factory=lambda: [0.0, 0.4])
    #: budgets are fractions of the compressible parameters (params) or of the transformer-block MACs of one
    #: UNet call at the benchmark's resolution (macs: the share the ideal speed-up is computed from)
    budget_unit: str = "params"
    batches: list[int] = field(default_factory=lambda: [1, 2])
    resolution: int | None = None  # image pixels; None: the model's default
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # float16 | float32 | bfloat16; None: float16 on cuda, float32 on cpu
    warmup: int = 3
    iters: int = 20  # timed calls of a dense cell; timed dense/slim pairs of a slim cell
    noisy_max_relative_width: float = NOISY_MAX_RELATIVE_WIDTH
    noisy_over_ideal: float = NOISY_OVER_IDEAL
    e2e: bool = True
    e2e_steps: int = 25
    e2e_runs: int = 3
    guidance: float = 7.5
    stats: str | None = None  # calibration statistics directory (real slimming)
    calib_prompts: int = 0  # > 0: calibrate this many SlimSet prompts first (real slimming)
    calib_steps: int = 10
    align: int = 8
    r_min: int = 8
    #: zero-pad every slim attention's per-head q·k and v widths to one multiple of this (exact: see
    #: slimdiff.export.align) — equal widths keep SDPA on its flash kernel; None leaves the widths as planned.
    pad_heads: int | None = None
    allocator: str = "greedy"  # as SlimConfig: the softmax lost to uniform allocation in the proxy ablation
    seed: int = 0
    compile_mode: str | None = None
    deadline_s: float | None = None
    #: engine → seconds a first build is assumed to need (before one was observed) for the deadline check.
    build_estimates_s: dict[str, float] = field(default_factory=dict)
    workdir: str | None = None
    prompt: str = DEFAULT_PROMPT
    command: str | None = None  # how the run was started, for the report (default: sys.argv)

    def __post_init__(self):
        if not self.budgets or any(b < 0 for b in self.budgets):
            raise SlimDiffError("budgets must be ≥ 0 (0 = dense)")
        if not self.batches or any(b < 1 for b in self.batches):
            raise SlimDiffError("batch sizes must be positive")
        if self.warmup < 0 or self.iters < 2 or self.e2e_runs < 1 or self.e2e_steps < 1:
            raise SlimDiffError("warm-up must be ≥ 0, timed calls ≥ 2 (a speed-up interval needs pairs), "
                                "end-to-end runs and steps ≥ 1")
        if self.stats and self.calib_prompts:
            raise SlimDiffError("give either calibration statistics or a number of prompts to calibrate, not both")
        if is_export_folder(self.model) and (self.budgets != [0.0] or self.stats or self.calib_prompts):
            raise SlimDiffError("an export folder brings its dense and slim models: leave out budgets, statistics "
                                "and calibration prompts (--budgets, --stats, --calib-prompts)")
        if self.budget_unit not in ("params", "macs"):
            raise SlimDiffError(f"budget unit must be params or macs, got {self.budget_unit!r}")
        if self.pad_heads is not None and self.pad_heads < 1:
            raise SlimDiffError(f"--pad-heads must be a positive multiple, got {self.pad_heads}")


def is_export_folder(source: str) -> bool:
    """Whether ``source`` is a ``slimdiff-export`` folder (read by :func:`read_export`)."""
    return (Path(source) / "export.json").is_file()


def read_export(source: str) -> dict | None:
    """The ``export.json`` of a ``slimdiff-export`` folder — its dense source, slim UNet folder and engines are
    what the benchmark then times, nothing rebuilt — or None for any other model source."""
    from ..export.meta import EXPORT_FORMAT, read_json

    if not is_export_folder(source):
        return None
    body = read_json(Path(source) / "export.json", "export metadata", EXPORT_FORMAT)
    if not body.get("dense_model") or not body.get("slim_model"):
        raise SlimDiffError(f"{source}: this export holds no dense source or no slim UNet folder to time (made from "
                            f"a slim folder, or by an older slimdiff-export); export from the dense model again")
    return body


def _resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.float16 if is_cuda(device) else torch.float32
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise SlimDiffError(f"dtype must be float16, bfloat16 or float32, got {name!r}")
    return dtype


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if out.shape != ref.shape:
        raise SlimDiffError(f"engine output shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class _Inputs:
    """Fixed UNet inputs per batch size: seeded latents, a mid-schedule timestep, real text embeddings."""

    def __init__(self, pipe, latent: tuple[int, int], device: str, dtype: torch.dtype, prompt: str, seed: int):
        with torch.no_grad():
            # keywords: SDXL's encode_prompt takes a second prompt in the second position
            embeds = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)[0].to(dtype)
        self.embeds, self.latent, self.device, self.dtype, self.seed = embeds, latent, device, dtype, seed
        self.channels = pipe.unet.config.in_channels

    def get(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        sample = torch.randn(batch, self.channels, *self.latent, generator=gen)
        timestep = torch.full((batch,), 500.0, dtype=torch.float32)
        return (sample.to(self.device, self.dtype), timestep.to(self.device),
                self.embeds.expand(batch, -1, -1).contiguous())


class WithAddedConditions(torch.nn.Module):
    """A UNet that needs ``added_cond_kwargs`` (SDXL: pooled text embeddings and size/crop ids), callable as
    the benchmark engines call a UNet — ``(sample, timestep, encoder_hidden_states)`` — with fixed seeded
    conditions expanded to the batch. Latency depends on their shapes, not their values."""

    def __init__(self, unet: torch.nn.Module, resolution: int, seed: int = 0):
        super().__init__()
        self.unet = unet
        cfg = unet.config
        param = next(unet.parameters())
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        gen = torch.Generator().manual_seed(seed)
        self.text_embeds = torch.randn(1, pooled, generator=gen).to(param.device, param.dtype)
        # original size, crop top-left, target size — what the SDXL pipeline passes for an uncropped image
        self.time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                     device=param.device, dtype=param.dtype)

    @property
    def config(self):
        return self.unet.config

    @staticmethod
    def needed(unet: torch.nn.Module) -> bool:
        return getattr(unet.config, "addition_embed_type", None) == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        b = sample.shape[0]
        added = {"text_embeds": self.text_embeds.expand(b, -1), "time_ids": self.time_ids.expand(b, -1)}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=return_dict)


@contextlib.contextmanager
def _engine_in_pipeline(pipe, run, timer: CallTimer):
    """Route the pipeline's UNet calls to ``run`` (timed), leaving the module object — and so the pipeline's
    config, dtype and device bookkeeping — in place."""
    unet = pipe.unet
    timed = timer.wrap(run)

    def forward(sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kwargs):
        extra = [k for k, v in kwargs.items() if v is not None]
        if args or extra:
            raise SlimDiffError(f"the benchmark UNet takes (sample, timestep, encoder_hidden_states) only; "
                                f"the pipeline also passed {extra or 'positional arguments'}")
        t = torch.as_tensor(timestep, device=sample.device).to(torch.float32).reshape(-1)
        out = timed(sample, t.expand(sample.shape[0]).contiguous(), encoder_hidden_states)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    unet.forward = forward
    try:
        yield
    finally:
        del unet.forward  # the instance attribute shadowed the class's forward


def _file_bytes(files: list[Path]) -> int | None:
    return sum(Path(f).stat().st_size for f in files) if files else None


def _free(device: str) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


class Bench:
    def __init__(self, config: BenchConfig, log=None):
        self.cfg = config
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.device = resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        self.t0 = time.perf_counter()
        self.observed_build: dict[str, float] = {}
        #: engine → the dense model's runner on it, kept while that engine's slim models are timed against it.
        self.dense_runs: dict[str, object] = {}
        self.export = read_export(config.model)

    # -- helpers -------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _deadline_reason(self, engine: str) -> str | None:
        if self.cfg.deadline_s is None:
            return None
        need = self.observed_build.get(engine, self.cfg.build_estimates_s.get(engine, 0.0))
        left = self.cfg.deadline_s - self.elapsed()
        if left <= 0 or need > left:
            return (f"not run: the suite's {self.cfg.deadline_s:.0f} s deadline leaves {max(left, 0):.0f} s, "
                    f"this engine needs ~{need:.0f} s per model")
        return None

    def _load(self):
        from ..families import check_measures
        from ..models import load_pipeline

        source, options = self.cfg.model, {}
        if self.export is not None:
            source = self.export["dense_model"]
            options = {k: self.export["arguments"].get(k) for k in ("config", "variant")}
        self.log(f"loading {source} ({str(self.dtype).removeprefix('torch.')}, {self.device})")
        pipe = load_pipeline(source, self.dtype, **options).to(self.device)
        check_measures(pipe, "slimdiff bench")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _statistics(self, pipe):
        if self.export is not None:
            return None, f"the slim UNet and the engines of the export folder {self.cfg.model} (slimdiff-export)"
        if self.cfg.stats:
            from ..calibrate import Statistics

            return Statistics.load(self.cfg.stats), f"statistics from {self.cfg.stats}"
        if self.cfg.calib_prompts > 0:
            from ..api import collect_statistics
            from ..calibrate import CalibrationConfig
            from ..prompts import read_prompts

            self.log(f"calibrating on {self.cfg.calib_prompts} SlimSet prompts × {self.cfg.calib_steps} steps")
            res = self.resolution
            pool = read_prompts(model=self.cfg.model)
            stats = collect_statistics(pipe, pool, self.cfg.calib_prompts, None, CalibrationConfig(
                steps=self.cfg.calib_steps, height=res, width=res, seed=self.cfg.seed,
                pass1_prompts=min(64, self.cfg.calib_prompts)), progress=False)
            return stats, (f"calibrated here: {self.cfg.calib_prompts} SlimSet prompts × {self.cfg.calib_steps} "
                           f"steps at {res}², CFG {self.cfg.guidance}")
        return None, None

    # -- the run ------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load the pipeline, calibrate if asked, build the models, count MACs, compute dense references."""
        cfg = self.cfg
        self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.environment_at_start = {"machine": machine_info(), "device": device_info(self.device),
                                     "libraries": library_versions(), "git": git_commit()}
        check_fits(cfg.model, cfg.budgets, cfg.budget_unit, cfg.resolution, self.device, self.dtype, align=cfg.align,
                   r_min=cfg.r_min)
        self.pipe = pipe = self._load()
        factor = pipe.vae_scale_factor
        self.resolution = cfg.resolution or pipe.unet.config.sample_size * factor
        # Every down-sampling level halves the latent; skip connections need it to divide evenly.
        multiple = factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)
        if self.resolution % multiple:
            raise SlimDiffError(f"resolution {self.resolution} must be a multiple of {multiple} for this model")
        self.latent = latent = (self.resolution // factor, self.resolution // factor)
        self.stats, self.stats_note = self._statistics(pipe)
        self.slim_config = None
        if self.stats is not None:
            from ..slim import SlimConfig

            self.slim_config = SlimConfig(budget=0.4, allocator=cfg.allocator, align=cfg.align, r_min=cfg.r_min)
        self.log(f"opening the slim UNet of {cfg.model}" if self.export is not None else
                 f"building {len(cfg.budgets)} models (budgets {', '.join(f'{b:g}' for b in cfg.budgets)})")
        self.inputs = _Inputs(pipe, latent, self.device, self.dtype, cfg.prompt, cfg.seed)
        # End-to-end runs route the pipeline's UNet calls through (sample, timestep, context) runners, which
        # cannot carry SDXL's added conditions: UNet-only for such models.
        self.e2e = cfg.e2e and not WithAddedConditions.needed(pipe.unet)
        if cfg.e2e and not self.e2e:
            self.log("end-to-end runs skipped: this UNet takes added conditions (SDXL); UNet-only timing")
        if not self.e2e:  # UNet-only from here: SDXL's text encoders and VAE hold 3.6 GB in fp32
            for name in ("text_encoder", "text_encoder_2", "vae"):
                if getattr(pipe, name, None) is not None:
                    setattr(pipe, name, None)
            _free(self.device)
        if self.export is not None:
            self.models = self._exported_models(pipe.unet)
        else:
            self.models = make_models(pipe.unet, cfg.budgets, stats=self.stats, slim_config=self.slim_config,
                                      seed=cfg.seed, align=cfg.align, r_min=cfg.r_min, unit=cfg.budget_unit,
                                      latent=latent, text_len=self.inputs.embeds.shape[1])
        if cfg.pad_heads:
            self._pad_heads(self.models)
        self.dense_params = sum(p.numel() for p in pipe.unet.parameters())
        self.model_entries = [self._model_entry(m) for m in self.models]

        # Dense eager references: UNet outputs on the fixed inputs, and images for end-to-end errors.
        dense_run = engine_registry.create("eager").build(self.runnable(pipe.unet), cfg.batches, latent, 0,
                                                          Path()).run
        self.refs = {}
        with torch.no_grad():
            for b in cfg.batches:
                self.refs[b] = dense_run(*self.inputs.get(b)).float().cpu()
        self.e2e_ref = {b // 2: self._pipeline(pipe, dense_run, b // 2, CallTimer(self.device))
                        for b in cfg.batches if self.e2e and b % 2 == 0}
        self.engine_entries: dict[str, dict] = {}
        self.results: list[dict] = []

    def _exported_models(self, dense: torch.nn.Module) -> list[SlimModel]:
        """The export's dense model and its slim UNet folder, each with its engine folder for the export's engine
        kind; the slim model's key is the fraction of the compressible parameters its plan removed."""
        from ..serialization import load_plan, load_slim

        root, kind = Path(self.cfg.model), self.export["engine"]
        slim_folder = root / self.export["slim_model"]  # relative to the export, or absolute
        plan = load_plan(slim_folder)
        slim = load_slim(slim_folder, dtype=self.dtype, device=self.device).eval().requires_grad_(False)
        budget = round(plan.params_removed / plan.compressible_params, 4)
        dense_engine = {kind: root / "dense"} if (root / "dense").is_dir() else {}
        return [SlimModel(dense, 0.0, None, "dense", {"engine_folders": dense_engine}),
                SlimModel(slim, budget, plan, CALIBRATED, {"engine_folders": {kind: root / "slim"},
                                                           "label": f"exported slim ({slim_folder})"})]

    def runnable(self, unet: torch.nn.Module) -> torch.nn.Module:
        """``unet`` as the engines call it: SDXL-style UNets get their added conditions bound (end-to-end
        pipeline runs pass their own, so the harness disables them for such models)."""
        return WithAddedConditions(unet, self.resolution, self.cfg.seed) if WithAddedConditions.needed(unet) else unet

    def _pad_heads(self, models: list[SlimModel]) -> None:
        from ..export.align import align_head_widths

        for m in models:
            if m.budget > 0:
                changed = align_head_widths(m.unet, multiple=self.cfg.pad_heads, equal_qk_v=True)
                m.info["head_padding"] = {k: [list(a), list(b)] for k, (a, b) in changed.items()}

    def add_models(self, models: list[SlimModel]) -> None:
        """Measure these slim models too (after :meth:`prepare`): plans made outside the budget list, e.g. a
        fraction of the transformer MACs or a latency budget. Each needs its own ``budget`` key (a float)."""
        known = {m.budget for m in self.models}
        for m in models:
            if m.budget <= 0 or m.budget in known:
                raise SlimDiffError(f"model key {m.budget} must be positive and not already measured")
            known.add(m.budget)
        if self.cfg.pad_heads:
            self._pad_heads(models)
        self.models.extend(models)
        self.model_entries.extend(self._model_entry(m) for m in models)

    def _model_entry(self, m: SlimModel) -> dict:
        shapes = meta_unet(self.pipe.unet, m.plan)
        macs = {str(b): count_macs(shapes, b, self.latent).to_dict() for b in self.cfg.batches}
        params = sum(p.numel() for p in m.unet.parameters())
        info = m.plan.info if m.plan else {}
        return {
            "budget": m.budget, "source": m.source, "params": params, "params_removed": self.dense_params - params,
            "removed_by_kind": m.plan.removed_by_kind() if m.plan else {},
            "compressible_params": m.plan.compressible_params if m.plan else None,
            "ranks": {n: e.rank for n, e in m.plan.modules.items()} if m.plan else None,
            "macs": macs, "label": m.info.get("label"), "head_padding": m.info.get("head_padding"),
            "plan_info": {k: v for k, v in info.items() if k in (
                "source", "scores", "budget", "budget_unit", "budget_resolved", "align", "r_min", "slim_config",
                "num_prompts")},
        }

    def run_engines(self, names: list[str], order: list[tuple[str, float]] | None = None,
                    budgets: list[float] | None = None, keep_dense: bool = False) -> None:
        """Measure ``names`` on every model (``budgets``: on these only). Default order: eager first, then the
        other engines budget by budget in the order the budgets were given; ``order`` lists (engine, budget)
        jobs by priority instead (jobs it leaves out run after it, in the default order). ``keep_dense`` keeps
        each engine's dense model loaded after the call, so that a later call times new slim models against
        it without measuring it again (:meth:`release_dense` frees them)."""
        engines = {n: engine_registry.create(n, compile_mode=self.cfg.compile_mode) for n in names}
        for name, engine in engines.items():
            reason = engine.unavailable(self.device)
            self.engine_entries[name] = {"description": engine.description,
                                         "status": "skipped" if reason else "ok", "reason": reason}
            if reason:
                self.log(f"engine {name}: skipped — {reason}")
        index = {m.budget: i for i, m in enumerate(self.models)}
        chosen = [i for i, m in enumerate(self.models) if budgets is None or m.budget in budgets]
        default = [(n, i) for n in engines if n == "eager" for i in chosen]
        default += [(n, i) for i in chosen for n in engines if n != "eager"]
        jobs = list(dict.fromkeys((n, index[b]) for n, b in (order or []) if n in engines and b in index
                                  and index[b] in chosen))
        jobs += [j for j in default if j not in jobs]
        # A slim model is timed against the dense model on the same engine, so the dense job moves up to just
        # before the first slim job of its engine.
        dense = index.get(0.0)
        if dense is not None:
            for n in engines:
                if (n, dense) in jobs:
                    jobs.remove((n, dense))
                first = next((k for k, (m, _) in enumerate(jobs) if m == n), None)
                if n not in self.dense_runs and (first is not None or dense in chosen):
                    jobs.insert(len(jobs) if first is None else first, (n, dense))
        last_job = {n: k for k, (n, _) in enumerate(jobs)}
        workroot = Path(self.cfg.workdir) if self.cfg.workdir else Path(tempfile.mkdtemp(prefix="slimdiff-bench-"))
        workroot.mkdir(parents=True, exist_ok=True)
        try:
            for k, (name, i) in enumerate(jobs):
                if self.engine_entries[name]["status"] == "ok":
                    self.results.extend(self._run_engine_model(name, engines[name], self.models[i],
                                                               workroot / f"{name}-{i}"))
                if last_job[name] == k and not keep_dense:
                    self.dense_runs.pop(name, None)
                    _free(self.device)
        finally:
            if not keep_dense:
                self.release_dense()
            if not self.cfg.workdir:
                shutil.rmtree(workroot, ignore_errors=True)

    def release_dense(self) -> None:
        """Free the dense models kept by ``run_engines(keep_dense=True)``."""
        self.dense_runs.clear()
        _free(self.device)

    def report(self) -> dict:
        cfg = self.cfg
        _speedups(self.results, self.model_entries, cfg.noisy_max_relative_width, cfg.noisy_over_ideal,
                  cpus=self.environment_at_start["machine"].get("cpu_count"))
        environment = dict(self.environment_at_start)
        if is_cuda(self.device):
            environment["clocks_at_end"] = device_info(self.device).get("clocks")
        return {
            "schema": SCHEMA,
            "created": self.started,
            "wall_seconds": round(self.elapsed(), 1),
            "command": cfg.command or " ".join(sys.argv),
            "config": {k: v for k, v in asdict(cfg).items() if k != "build_estimates_s"},
            "timing_method": TIMING_METHOD,
            "model": {
                "source": cfg.model, "weights": self._weights_kind(), "dtype": str(self.dtype).removeprefix("torch."),
                "resolution": self.resolution, "latent": list(self.latent), "dense_params": self.dense_params,
                "budget_unit": BUDGET_UNITS[cfg.budget_unit],
                "plan_source": "calibrated" if self.stats is not None or self.export is not None else SYNTHETIC,
                "plan_note": self.stats_note or (
                    "synthetic plans: the real allocator on uniform scores (no calibration statistics) and seeded "
                    "random values in the resized layers — latency is real, outputs and errors of slim models are "
                    "not meaningful"),
            },
            "environment": environment,
            "mac_counter": counter_notes(),
            "models": self.model_entries,
            "engines": self.engine_entries,
            "results": self.results,
        }

    def run(self) -> dict:
        self.prepare()
        self.run_engines(self.cfg.engines)
        return self.report()

    def _weights_kind(self) -> str:
        from ..serialization import is_slim_folder, load_plan

        source = self.export["dense_model"] if self.export is not None else self.cfg.model
        if not source.startswith("builtin:") and is_slim_folder(source):
            source = load_plan(source).info.get("source_model", source)
        return weights_kind(source)

    def _run_engine_model(self, name, engine, model: SlimModel, workdir: Path) -> list[dict]:
        cfg = self.cfg
        cells = []
        for batches in [cfg.batches]:  # one engine per model serves every batch size
            base = {"engine": name, "budget": model.budget}
            reason = self._deadline_reason(name)
            if reason:
                self.log(f"{name} budget {model.budget:g}: {reason}")
                cells += [{**base, "batch": b, "status": "skipped", "reason": reason} for b in batches]
                continue
            started = time.perf_counter()
            try:
                cells += self._build_and_measure(name, engine, model, batches, workdir / "-".join(map(str, batches)))
            except Exception as exc:  # one engine failing must not lose the others' results
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.log(f"{name} budget {model.budget:g}: failed — {first}")
                cells += [{**base, "batch": b, "status": "failed", "reason": f"{type(exc).__name__}: {first}"}
                          for b in batches]
            finally:
                _free(self.device)
            took = time.perf_counter() - started
            self.observed_build[name] = max(self.observed_build.get(name, 0.0), took)
        return cells

    def _build_and_measure(self, name, engine, model: SlimModel, batches, workdir: Path) -> list[dict]:
        cfg, pipe, inputs, refs = self.cfg, self.pipe, self.inputs, self.refs
        workdir.mkdir(parents=True, exist_ok=True)
        weights_bytes = sum(p.numel() * p.element_size() for p in model.unet.parameters())
        memory = PeakMemory(self.device).start()
        t_build = time.perf_counter()
        prebuilt = model.info.get("engine_folders", {}).get(name)
        built = (engine.open(prebuilt, self.device) if prebuilt is not None else
                 engine.build(self.runnable(model.unet), batches, self.latent, inputs.embeds.shape[1], workdir))
        build_s = time.perf_counter() - t_build
        dense_run = self.dense_runs.get(name) if model.budget > 0 else None
        cells = []
        for b in batches:
            sample, timestep, context = inputs.get(b)
            with torch.no_grad(), wall_clock(self.device) as first:
                out = built.run(sample, timestep, context).float().cpu()  # lazy engines compile here
            paired, load_before = None, load_average()
            if dense_run is None:
                timing = time_calls(lambda: built.run(sample, timestep, context), self.device, cfg.warmup, cfg.iters)
            else:
                dense_ms, slim_ms = time_interleaved(lambda: dense_run(sample, timestep, context),
                                                     lambda: built.run(sample, timestep, context), self.device,
                                                     cfg.warmup, cfg.iters)
                timing = summarize(slim_ms, cfg.warmup, clock_name(self.device))
                paired = {"dense_unet": summarize(dense_ms, cfg.warmup, clock_name(self.device)).to_dict(),
                          "interval": speedup_interval(dense_ms, slim_ms, seed=cfg.seed),
                          "dense_ms": [round(v, 4) for v in dense_ms], "slim_ms": [round(v, 4) for v in slim_ms]}
            eager_err = None
            if name != "eager":
                with torch.no_grad():
                    eager = self.runnable(model.unet)(sample, timestep, encoder_hidden_states=context,
                                               return_dict=False)[0].float().cpu()
                eager_err = _rel_err(out, eager)
            cell = {
                "engine": name, "budget": model.budget, "batch": b, "status": "ok",
                "unet": timing.to_dict(), "build_s": round(build_s, 3), "first_call_ms": round(first[0], 3),
                "error_vs_dense": _rel_err(out, refs[b]) if model.meaningful_outputs or model.budget == 0 else None,
                "error_vs_eager": eager_err,
                "engine_file_bytes": _file_bytes(built.files), "weights_bytes": weights_bytes,
                "engine_info": built.info,
                "interleaved": paired,
                "load_average": [load_before, load_average()],  # 1-minute, before and after the timed calls
            }
            if self.e2e and b % 2 == 0:
                cell["e2e"] = self._e2e(pipe, built.run, b // 2, model)
            cell["memory"] = memory.read()
            if is_cuda(self.device):
                cell["clocks_after"] = device_info(self.device).get("clocks")
            against = "" if paired is None else (
                f"; dense interleaved {paired['dense_unet']['median_ms']:.2f} ms → "
                f"{paired['interval']['speedup']:.3f}× [{paired['interval']['low']:.3f}, "
                f"{paired['interval']['high']:.3f}]")
            self.log(f"{name:>8} budget {model.budget:<4g} batch {b}: median {timing.median_ms:8.2f} ms "
                     f"(p90 {timing.p90_ms:.2f}){against}")
            cells.append(cell)
        if model.budget == 0:
            self.dense_runs[name] = built.run
        return cells

    def _pipeline(self, pipe, run, images: int, timer: CallTimer) -> torch.Tensor:
        """One text-to-image run (seeded latents, decoded images) with the UNet calls routed to ``run``."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        with _engine_in_pipeline(pipe, run, timer), torch.no_grad():
            out = pipe([cfg.prompt] * images, num_inference_steps=cfg.e2e_steps, guidance_scale=cfg.guidance,
                       height=self.resolution, width=self.resolution, generator=gen, output_type="np").images
        return torch.from_numpy(out).float()

    def _e2e(self, pipe, run, images: int, model: SlimModel) -> dict:
        cfg = self.cfg
        totals, inside, calls, last = [], [], [], None
        for i in range(cfg.e2e_runs + 1):  # the first run warms up (allocations, lazy compilation)
            timer = CallTimer(self.device)
            with wall_clock(self.device) as wall:
                last = self._pipeline(pipe, run, images, timer)
            if i:
                totals.append(wall[0])
                inside.append(timer.total_ms())
                calls.append(timer.calls)
        meaningful = model.meaningful_outputs or model.budget == 0
        error = _rel_err(last, self.e2e_ref[images]) if meaningful else None
        psnr = _psnr_db(last, self.e2e_ref[images]) if meaningful else None
        total, unet_ms = _median(totals), _median(inside)
        return {"images": images, "steps": cfg.e2e_steps, "guidance": cfg.guidance, "runs": cfg.e2e_runs,
                "total_ms": total, "unet_ms": unet_ms, "outside_unet_ms": total - unet_ms,
                "unet_calls": calls[-1], "image_error_vs_dense": error, "image_psnr_db_vs_dense": psnr,
                "unet_timing": "cuda-events (summed, unsynchronised)" if is_cuda(self.device) else "perf_counter"}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def _psnr_db(images: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [0, 1] against the dense model's images of the same seeds, each capped at
    100 dB as ``slimdiff eval`` caps identical pairs."""
    mse = (images.double() - ref.double()).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).clamp_max(100.0).mean())


TIMING_METHOD = (
    "slim and dense timed interleaved (alternating calls AB BA AB …, one process, same inputs and threads); "
    "speed-up = median over pairs of dense/slim with a seeded bootstrap percentile interval; a cell is noisy "
    "when the interval is wider than the stated fraction of the speed-up or the speed-up exceeds the ideal "
    "(MAC ratio) by more than the stated margin")


def _speedups(results: list[dict], models: list[dict], max_relative_width: float = NOISY_MAX_RELATIVE_WIDTH,
              over_ideal: float = NOISY_OVER_IDEAL, cpus: int | None = None) -> None:
    """Fill speed-up (median of interleaved pair ratios, same engine and batch) with its interval and verdict, ideal
    speed-up (dense MACs / slim MACs) and measured/ideal into every measured cell. A slim cell without an
    interleaved dense partner gets no speed-up: medians from different moments of a shared machine are not a
    ratio anyone should read."""
    macs = {(m["budget"], int(b)): v["total"] for m in models for b, v in m["macs"].items()}
    dense = {(r["engine"], r["batch"]): r for r in results if r["budget"] == 0 and r["status"] == "ok"}
    for r in results:
        if r["status"] != "ok":
            continue
        ideal = macs[(0.0, r["batch"])] / macs[(r["budget"], r["batch"])] if (0.0, r["batch"]) in macs else None
        base = dense.get((r["engine"], r["batch"]))
        interval = (r.get("interleaved") or {}).get("interval")
        if r["budget"] == 0:
            speedup, r["speedup_status"], r["noisy_reasons"] = 1.0, "reference", []
        elif interval is None:
            speedup, r["speedup_status"] = None, "not-measured"
            r["noisy_reasons"] = ["no dense model was timed alongside it on this engine"]
        else:
            speedup = interval["speedup"]
            loads = [v for v in r.get("load_average") or [] if v is not None]
            r["noisy_reasons"] = judge_speedup(interval, ideal, max_relative_width, over_ideal,
                                               load=max(loads, default=None), cpus=cpus)
            r["speedup_status"] = "noisy" if r["noisy_reasons"] else "measured"
        r["ideal_speedup"] = ideal
        r["speedup"] = speedup
        r["measured_over_ideal"] = speedup / ideal if speedup and ideal else None
        # The share of the ideal *gain* realised: 1 when the MAC reduction turns fully into time saved.
        r["gain_realised"] = (speedup - 1) / (ideal - 1) if speedup and ideal and ideal > 1 else None
        if base and r.get("e2e") and base.get("e2e"):
            r["e2e"]["speedup"] = base["e2e"]["total_ms"] / r["e2e"]["total_ms"]


def run_bench(config: BenchConfig, log=None) -> dict:
    return Bench(config, log).run()
