"""The latency benchmark: dense vs slim denoisers on the same engines, denoiser-only and end-to-end.

The denoiser is a UNet (SD-1.x/2.x, SDXL) or a DiT (PixArt, SD3, FLUX): everything the harness needs to know about
it — which pipeline component it is, its default size and latent size rule, the inputs of one call for a prompt, the
positional call engines run and how a pipeline's call maps onto it (FLUX's packed latents) — comes from its model
family (:mod:`slimdiff.families`). Reports keep the UNet-era key ``unet`` for a cell's denoiser timing.

For every engine that can run here, every budget (0 = dense) and every denoiser batch size it measures the
denoiser call (warm-ups, then timed calls: median and p90) — a slim model *interleaved* with the dense model on the
same engine (alternating calls in one process, same inputs, same threads), its speed-up the median of the per-pair
ratios dense/slim with a bootstrap confidence interval, and the cell marked *noisy* when that interval is wide,
the speed-up beats the ideal by more than a few percent or the machine was busy (:mod:`.timing`) — the error
of the engine's output against the dense eager model on the same inputs, MACs and parameters
(``torch.utils.flop_counter``), the ideal speed-up (dense MACs / slim MACs) and the measured/ideal ratio, peak
memory and engine file size. It also runs the whole pipeline wherever the batch is a whole number of images — two
rows per image under classifier-free guidance, one where guidance is embedded (FLUX.1-dev, LCM UNets: the family's
``guided_rows_per_image``), so the denoiser sees the batch it was timed at — and splits its latency into time inside
and outside the denoiser.

Cells are run in priority order — eager first, then the other engines budget by budget in the order given —
and a ``deadline_s`` skips (and reports) the cells that would not finish in time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import inspect
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import SlimDiffError
from ..export.meta import EXPORT_FILE, EXPORT_FORMAT, is_export_folder, read_json
from ..families import MODEL_DTYPE, SIGMA, TIMESTEP, family_for
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
                "macs": "fraction of the transformer-block MACs of one denoiser call removed"}
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon"
#: The timestep every timed denoiser call takes, halfway through sampling, by how the family's exported timestep is
#: drawn: the schedulers' timestep 500 of 1000, or the flow-matching sigma 0.5 (FLUX).
MID_SCHEDULE = {TIMESTEP: 500.0, SIGMA: 0.5}


@dataclass
class BenchConfig:
    model: str
    engines: list[str] = field(default_factory=lambda: ["eager"])
    budgets: list[float] = field(default_factory=lambda: [0.0, 0.4])
    #: budgets are fractions of the compressible parameters (params) or of the transformer-block MACs of one
    #: denoiser call at the benchmark's resolution (macs: the share the ideal speed-up is computed from)
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
    calib_images: str | None = None  # that calibration's images (inpainting models, the SDXL refiner)
    calib_strength: float | None = None  # and their pipeline's strength
    calib_base: str | None = None  # or the SDXL base whose latents that calibration refines (the SDXL refiner)
    calib_refiner_start: float | None = None  # and where the base hands them over (None: CalibrationConfig's 0.8)
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
        if self.calib_prompts < 0 or self.calib_steps < 1:
            raise SlimDiffError("calibration prompts must be ≥ 0 (0: synthetic plans) and calibration steps ≥ 1")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise SlimDiffError(f"the deadline is seconds from the start, and must be positive: got {self.deadline_s}")
        if self.stats and self.calib_prompts:
            raise SlimDiffError("give either calibration statistics or a number of prompts to calibrate, not both")
        if (self.calib_images is not None or self.calib_strength is not None) and not self.calib_prompts:
            raise SlimDiffError("--images and --strength are calibration's: give --calib-prompts N too")
        if self.calib_refiner_start is not None and self.calib_base is None:
            raise SlimDiffError("--refiner-start is where the base model hands its latents to the refiner: give "
                                "--base too")
        if self.calib_base is not None and not self.calib_prompts:
            raise SlimDiffError("--base and --refiner-start are calibration's: give --calib-prompts N too")
        if brings_models(self.model) and (self.budgets != [0.0] or self.stats or self.calib_prompts):
            raise SlimDiffError(f"{self.model} brings its dense and slim models (an export folder, a slim folder): "
                                "leave out budgets, statistics and calibration prompts (--budgets, --stats, "
                                "--calib-prompts)")
        if self.budget_unit not in ("params", "macs"):
            raise SlimDiffError(f"budget unit must be params or macs, got {self.budget_unit!r}")
        if self.pad_heads is not None and self.pad_heads < 1:
            raise SlimDiffError(f"--pad-heads must be a positive multiple, got {self.pad_heads}")


@dataclass(frozen=True)
class GivenModels:
    """The dense and the slim model a benchmark source brings, timed as they are: nothing calibrated or slimmed,
    and the engines of ``engine`` (an export's kind) opened from ``engine_root``, not built again."""

    dense: dict  # load_pipeline's arguments for the dense model
    slim_folder: Path
    engine: str | None
    engine_root: Path | None
    note: str


def brings_models(source: str) -> bool:
    """Whether ``source`` brings its own dense and slim models (:func:`given_models`), read without loading."""
    from ..serialization import slim_denoiser_folder

    return is_export_folder(source) or slim_denoiser_folder(source) is not None


def given_models(source: str) -> GivenModels | None:
    """What ``source`` brings to be timed: a ``slimdiff-export`` folder its dense source, slim UNet folder and
    engines; a slim folder or slim pipeline folder its slim denoiser, against the model it was slimmed from (with
    the LoRAs fused then); None for a model the benchmark slims itself."""
    from ..models import dense_source
    from ..serialization import slim_denoiser_folder

    export = read_export(source)
    if export is not None:
        root = Path(source)
        dense = {"source": export["dense_model"], **{k: export["arguments"].get(k) for k in ("config", "variant")}}
        return GivenModels(dense, root / export["slim_model"], export["engine"], root,  # slim_model: or absolute
                           f"the slim UNet and the engines of the export folder {source} (slimdiff-export)")
    folder = slim_denoiser_folder(source)
    if folder is None:
        return None
    dense = dense_source(str(folder))
    return GivenModels(dense, folder, None, None,
                       f"the slim folder {folder}, against {dense['source']} it was slimmed from")


def read_export(source: str) -> dict | None:
    """The ``export.json`` of a ``slimdiff-export`` folder — its dense source, slim UNet folder and engines are
    what the benchmark then times, nothing rebuilt — or None for any other model source."""
    if not is_export_folder(source):
        return None
    body = read_json(Path(source) / EXPORT_FILE, "export metadata", EXPORT_FORMAT)
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
    """Fixed denoiser inputs per batch size, in the order of the family's exported inputs: a seeded latent, a
    mid-schedule timestep (:data:`MID_SCHEDULE`), and the conditioning the pipeline makes for one prompt (real text
    embeddings, the family's extra conditions), expanded to the batch."""

    def __init__(self, pipe, family, latent: tuple[int, int], resolution: int, device: str, dtype: torch.dtype,
                 prompt: str, seed: int):
        denoiser = family.denoiser(pipe)
        self.specs = family.export_inputs(denoiser.config)
        with torch.no_grad():
            given = family.prompt_inputs(pipe, prompt, (resolution, resolution), device)
        self.given, self.text_len = {}, 0
        for spec in self.specs:
            if "height" in spec.dims or spec.draw in MID_SCHEDULE:
                continue
            if spec.name not in given:
                raise SlimDiffError(f"the {family.name!r} family's prompt inputs lack {spec.name!r}")
            value = given[spec.name].to(device, dtype if spec.dtype == MODEL_DTYPE else getattr(torch, spec.dtype))
            self.given[spec.name] = value
            if "text_len" in spec.dims:
                self.text_len = value.shape[spec.dims.index("text_len")]
        self.latent, self.device, self.dtype, self.seed = latent, device, dtype, seed

    def get(self, batch: int) -> tuple[torch.Tensor, ...]:
        out = []
        for spec in self.specs:
            if "height" in spec.dims:  # the latent
                gen = torch.Generator().manual_seed(self.seed)
                shape = tuple(batch if d == "batch" else d for d in spec.dims[:2]) + self.latent
                out.append(torch.randn(shape, generator=gen).to(self.device, self.dtype))
            elif spec.draw in MID_SCHEDULE:
                out.append(torch.full((batch,), MID_SCHEDULE[spec.draw], dtype=torch.float32, device=self.device))
            else:
                value = self.given[spec.name]
                out.append(value.expand(batch, *value.shape[1:]).contiguous())
        return tuple(out)


@contextlib.contextmanager
def _engine_in_pipeline(pipe, family, run, timer: CallTimer):
    """Route the pipeline's denoiser calls to ``run`` (timed) on the family's exported inputs (the family maps the
    pipeline's call onto them: :meth:`~slimdiff.families.DenoiserFamily.exported_from_call`), leaving the module
    object — and so the pipeline's config, dtype and device bookkeeping — in place."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    denoiser = family.denoiser(pipe)
    specs = family.export_inputs(denoiser.config)
    signature = inspect.signature(denoiser.forward)
    timed = timer.wrap(run)

    def forward(*args, **kwargs):
        call = signature.bind(*args, **kwargs).arguments
        return_dict = call.pop("return_dict", True)
        call = {**(call.pop("added_cond_kwargs", None) or {}), **call}
        call, to_prediction = family.exported_from_call(call)
        extra = [k for k, v in call.items() if v is not None and k not in {s.name for s in specs}]
        if extra:
            raise SlimDiffError(f"the benchmark {family.component} takes its exported inputs only "
                                f"({', '.join(s.name for s in specs)}); the pipeline also passed {', '.join(extra)}")
        batch = call[specs[0].name].shape[0]
        inputs = []
        for spec in specs:
            value = call.get(spec.name)
            if value is None:
                raise SlimDiffError(f"the pipeline's {family.component} call passed no {spec.name!r}")
            if spec.draw in MID_SCHEDULE:  # pipelines pass one timestep for the batch, or one per sample
                value = torch.as_tensor(value, device=inputs[0].device).to(torch.float32).reshape(-1)
                value = value.expand(batch).contiguous()
            inputs.append(value)
        del denoiser.forward  # an eager runner calls the module itself
        try:
            out = to_prediction(timed(*inputs))
        finally:
            denoiser.forward = forward
        # every output class of diffusers' denoisers holds the prediction in ``sample``
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    denoiser.forward = forward
    try:
        yield
    finally:
        del denoiser.forward  # the instance attribute shadowed the class's forward


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
        self.given = given_models(config.model)

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
        from ..models import load_pipeline

        options = {"source": self.cfg.model} if self.given is None else self.given.dense
        self.log(f"loading {options['source']} ({str(self.dtype).removeprefix('torch.')}, {self.device})")
        pipe = load_pipeline(dtype=self.dtype, **options).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _statistics(self, pipe):
        if self.given is not None:
            return None, self.given.note
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
                pass1_prompts=min(64, self.cfg.calib_prompts), images=self.cfg.calib_images,
                strength=self.cfg.calib_strength, **self._ensemble()), progress=False)
            ensemble = "" if stats.config.base is None else \
                f", refining the latents of {stats.config.base} from {stats.config.refiner_start} of the schedule on"
            return stats, (f"calibrated here: {self.cfg.calib_prompts} SlimSet prompts × {self.cfg.calib_steps} "
                           f"steps at {res}², CFG {self.cfg.guidance}{ensemble}")
        return None, None

    def _ensemble(self) -> dict:
        """The calibration's base model and hand-over, for a refiner calibrated on a base's latents."""
        if self.cfg.calib_base is None:
            return {}
        start = self.cfg.calib_refiner_start
        return {"base": self.cfg.calib_base, **({} if start is None else {"refiner_start": start})}

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
        self.family = family = family_for(pipe).calling(pipe)  # a FLUX ControlNet pipeline's: with its samples
        dense = family.denoiser(pipe)
        self._check_drivable(family.export_inputs, dense.config)
        factor = pipe.vae_scale_factor
        family.check_image_size(pipe, cfg.resolution, cfg.resolution)
        self.resolution = cfg.resolution or family.sample_size(dense.config)[0] * factor
        self.latent = latent = (self.resolution // factor, self.resolution // factor)
        # before any calibration: a family that declares no prompt inputs is refused here
        self.inputs = self._check_drivable(_Inputs, pipe, family, latent, self.resolution, self.device, self.dtype,
                                           cfg.prompt, cfg.seed)
        self.stats, self.stats_note = self._statistics(pipe)
        self.slim_config = None
        if self.stats is not None:
            from ..slim import SlimConfig

            self.slim_config = SlimConfig(budget=0.4, allocator=cfg.allocator, align=cfg.align, r_min=cfg.r_min)
        self.log(f"opening the slim {family.component} of {cfg.model}" if self.given is not None else
                 f"building {len(cfg.budgets)} models (budgets {', '.join(f'{b:g}' for b in cfg.budgets)})")
        self.e2e = cfg.e2e
        if not self.e2e:  # denoiser-only from here: SDXL's text encoders and VAE hold 3.6 GB in fp32, SD3's T5 19 GB
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
                if getattr(pipe, name, None) is not None:
                    setattr(pipe, name, None)
            _free(self.device)
        if self.given is not None:
            self.models = self._given_models(dense)
        else:
            self.models = make_models(dense, cfg.budgets, stats=self.stats, slim_config=self.slim_config,
                                      seed=cfg.seed, align=cfg.align, r_min=cfg.r_min, unit=cfg.budget_unit,
                                      latent=latent, text_len=self.inputs.text_len)
        if cfg.pad_heads:
            self._pad_heads(self.models)
        self.dense_params = sum(p.numel() for p in dense.parameters())
        self.model_entries = [self._model_entry(m) for m in self.models]

        # Dense eager references: denoiser outputs on the fixed inputs, and images for end-to-end errors.
        dense_run = engine_registry.create("eager", family=family).build(dense, cfg.batches, latent,
                                                                         self.inputs.text_len, Path()).run
        self.refs = {}
        with torch.no_grad():
            for b in cfg.batches:
                self.refs[b] = dense_run(*self.inputs.get(b)).float().cpu()
        rows = self.rows_per_image = family.guided_rows_per_image(dense.config)
        self.e2e_ref = {b // rows: self._pipeline(pipe, dense_run, b // rows, CallTimer(self.device))
                        for b in cfg.batches if self.e2e and b % rows == 0}
        self.engine_entries: dict[str, dict] = {}
        self.results: list[dict] = []

    @staticmethod
    def _check_drivable(fn, *args):
        """``fn(*args)``, a family's refusal to declare the call engines run (or its inputs) said as the bench's."""
        try:
            return fn(*args)
        except SlimDiffError as exc:
            raise SlimDiffError(f"slimdiff bench times a denoiser through its family's exported call: {exc}") from None

    def _given_models(self, dense: torch.nn.Module) -> list[SlimModel]:
        """The source's dense model and slim folder — with an export's engine folders for its engine kind; the slim
        model's key is the fraction of the compressible parameters its plan removed."""
        from ..serialization import load_plan, load_slim

        given = self.given
        plan = load_plan(given.slim_folder)
        slim = load_slim(given.slim_folder, dtype=self.dtype, device=self.device).eval().requires_grad_(False)
        budget = round(plan.params_removed / plan.compressible_params, 4)
        dense_engine, slim_engine, label = {}, {}, f"slim ({given.slim_folder})"
        if given.engine is not None:
            root = given.engine_root
            dense_engine = {given.engine: root / "dense"} if (root / "dense").is_dir() else {}
            slim_engine, label = {given.engine: root / "slim"}, f"exported slim ({given.slim_folder})"
        return [SlimModel(dense, 0.0, None, "dense", {"engine_folders": dense_engine}),
                SlimModel(slim, budget, plan, CALIBRATED, {"engine_folders": slim_engine, "label": label})]

    def _pad_heads(self, models: list[SlimModel]) -> None:
        from ..export.align import align_head_widths

        for m in models:
            if m.budget > 0:
                changed = align_head_widths(m.denoiser, multiple=self.cfg.pad_heads, equal_qk_v=True)
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
        shapes = meta_unet(self.family.denoiser(self.pipe), m.plan)
        macs = {str(b): count_macs(shapes, b, self.latent, self.inputs.text_len, self.family).to_dict()
                for b in self.cfg.batches}
        params = sum(p.numel() for p in m.denoiser.parameters())
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
        engines = {n: engine_registry.create(n, compile_mode=self.cfg.compile_mode, family=self.family) for n in names}
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
                "source": cfg.model, "family": self.family.name, "denoiser": self.family.component,
                "weights": self._weights_kind(), "dtype": str(self.dtype).removeprefix("torch."),
                "resolution": self.resolution, "latent": list(self.latent), "dense_params": self.dense_params,
                "budget_unit": BUDGET_UNITS[cfg.budget_unit],
                "plan_source": "calibrated" if self.stats is not None or self.given is not None else SYNTHETIC,
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

        source = self.given.dense["source"] if self.given is not None else self.cfg.model
        if not source.startswith("builtin:") and is_slim_folder(source):  # slimmed from a slim model
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
        weights_bytes = sum(p.numel() * p.element_size() for p in model.denoiser.parameters())
        memory = PeakMemory(self.device).start()
        t_build = time.perf_counter()
        prebuilt = model.info.get("engine_folders", {}).get(name)
        built = (engine.open(prebuilt, self.device) if prebuilt is not None else
                 engine.build(model.denoiser, batches, self.latent, inputs.text_len, workdir))
        build_s = time.perf_counter() - t_build
        dense_run = self.dense_runs.get(name) if model.budget > 0 else None
        cells = []
        for b in batches:
            call = inputs.get(b)
            with torch.no_grad(), wall_clock(self.device) as first:
                out = built.run(*call).float().cpu()  # lazy engines compile here
            paired, load_before = None, load_average()
            if dense_run is None:
                timing = time_calls(lambda: built.run(*call), self.device, cfg.warmup, cfg.iters)
            else:
                dense_ms, slim_ms = time_interleaved(lambda: dense_run(*call), lambda: built.run(*call), self.device,
                                                     cfg.warmup, cfg.iters)
                timing = summarize(slim_ms, cfg.warmup, clock_name(self.device))
                paired = {"dense_unet": summarize(dense_ms, cfg.warmup, clock_name(self.device)).to_dict(),
                          "interval": speedup_interval(dense_ms, slim_ms, seed=cfg.seed),
                          "dense_ms": [round(v, 4) for v in dense_ms], "slim_ms": [round(v, 4) for v in slim_ms]}
            eager_err = None
            if name != "eager":
                with torch.no_grad():
                    eager = self.family.export_call(model.denoiser, *call).float().cpu()
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
            rows = self.rows_per_image
            if self.e2e and b % rows == 0:
                cell["e2e"] = self._e2e(pipe, built.run, b // rows, model)
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
        """One text-to-image run (seeded latents, decoded images) with the denoiser calls routed to ``run``."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        with _engine_in_pipeline(pipe, self.family, run, timer), torch.no_grad():
            out = pipe(prompt=[cfg.prompt] * images, num_inference_steps=cfg.e2e_steps, guidance_scale=cfg.guidance,
                       generator=gen, output_type="np",
                       **self.family.measuring_call(self.resolution, self.resolution)).images
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
