"""Stage B — calibration: run the real sampling loop with hooks and collect float64 second moments.

Two passes (method.md §4), so SDXL's statistics fit in host memory:

* **pass 1** (the first ``pass1_prompts`` prompts) records, per timestep, only what the TRQ of every site needs
  — for each FFN the scalars E‖h‖² and E‖W_D h‖², for each attention the per-head Grams of its queries, keys
  and head outputs (H×d×d) and E‖x‖² — and how often the UNet is called at each timestep per sampling run. The
  timestep fidelity weights of every site follow;
* **pass 2** (all prompts) collects the same per-timestep quantities again (for the module scores) and
  accumulates every input moment the decompositions need directly fidelity-weighted, Σ̄ = Σ_t w_t Σ_t with w from
  pass 1: one I×I matrix per FFN, one C×C per attention and site (Q·K; V·O of a self-attention), and the
  timestep-free moment of the text context (one for all the cross-attentions that read the denoiser's own).
  Nothing C×C is kept per timestep.

Both CFG branches are in the batch and count with equal weight. Prompts are summed in fixed chunks of
``checkpoint_every`` batches, each chunk from zero, and the chunk sums are added in chunk order: the totals are
checkpointed atomically after each chunk, and a restarted run skips finished chunks. Every prompt has its own
seeded generator and the summation tree is fixed, so a resumed run — or one whose chunks were dealt over
torchrun processes (:mod:`slimdiff.distributed`) — ends with statistics bit-identical to an uninterrupted
single-process one. A chunk's sums stay on the UNet's device and are folded into the host total one tensor at
a time, so on a GPU the host holds the statistics once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .analyze import timestep_weights, trq_from_energies, trq_qk, trq_vo
from .distributed import Group
from .errors import SlimDiffError, SlimDiffWarning
from .families import (
    ATTENTION,
    CROSS,
    FFN,
    QK,
    TEXT_CONTEXT,
    VO,
    AttentionGrams,
    AttentionStatistics,
    ColumnBlock,
    FFNEnergies,
    FFNStatistics,
    ResidualEnergies,
    TextContextMoment,
    family_for,
    module_sites,
    site_linears,
    site_weights_fingerprint,
    transformer_blocks,
)
from .families.base import SEQ, seq_key
from .families.refiner import REFINER_START

STATS_FORMAT = "slimdiff-stats/2"
WEIGHTS_FILE = "timestep_weights.safetensors"
MANIFEST = "manifest.json"

# A batch loop runs the sampler on some prompts with one seed each; the hooks do the rest.
BatchLoop = Callable[[Sequence[str], Sequence[int]], None]


@dataclass(frozen=True)
class CalibrationConfig:
    """How the calibration trajectories are sampled and how timesteps are weighted (every site's moments).

    ``weighting``: ``"trq"`` (w ∝ prior·ρ^γ, the method), ``"uniform"`` (activation-aware without timestep
    weighting) or ``"single"`` (only the visited step nearest the middle of the trajectory — an ablation).
    ``images``: for inpainting models, the images whose seeded holes calibration fills
    (:mod:`slimdiff.families.inpaint`), and for the SDXL refiner the images it refines
    (:mod:`slimdiff.families.refiner`); text-to-image models take none. ``strength``: for those models, how much of
    the schedule is re-run over each image (None: inpainting 1.0, the refiner its pipeline's 0.3).
    ``base``: for the SDXL refiner instead of images, the SDXL base model (a folder, a single file or a built-in
    name, as :func:`slimdiff.load_pipeline` takes it) whose latents it refines in diffusers' ensemble of expert
    denoisers: the base runs the schedule to ``denoising_end=refiner_start``, the refiner from
    ``denoising_start=refiner_start`` on (``refiner_start`` is read only with a base). A path, not a pipeline: it
    is recorded with the statistics, so a resumed calibration with another base is refused.
    """

    steps: int = 25
    guidance_scale: float | None = None  # None: the pipeline's own default (SD 7.5, SDXL 5.0, PixArt 4.5)
    height: int | None = None
    width: int | None = None
    seed: int = 0
    batch_size: int = 1
    pass1_prompts: int = 64
    checkpoint_every: int = 8
    weighting: str = "trq"
    gamma: float = 1.0
    prior: str = "uniform"  # or "early": log-decreasing emphasis on early (high-noise) steps
    images: str | None = None  # a folder of images: what an inpainting model fills holes in, what a refiner refines
    strength: float | None = None
    base: str | None = None  # the SDXL refiner: the base model whose latents it refines (instead of images)
    refiner_start: float = REFINER_START  # with a base: the fraction of the schedule the base runs

    def __post_init__(self):
        if self.weighting not in ("trq", "uniform", "single"):
            raise SlimDiffError(f"unknown timestep weighting {self.weighting!r} (trq, uniform, single)")
        if self.prior not in ("uniform", "early"):
            raise SlimDiffError(f"unknown timestep prior {self.prior!r} (uniform, early)")
        if self.steps < 1 or self.batch_size < 1 or self.pass1_prompts < 1 or self.checkpoint_every < 1:
            raise SlimDiffError("steps, batch size, pass-1 prompts and checkpoint interval must be positive")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise SlimDiffError(f"strength {self.strength} is outside (0, 1]: it is the fraction of the schedule "
                                "re-run over each calibration image")
        if not 0 < self.refiner_start < 1:
            raise SlimDiffError(f"refiner start {self.refiner_start} is outside (0, 1): it is the fraction of the "
                                "schedule the base model runs before the refiner takes over its latents")
        photographs = [name for name in ("images", "strength") if getattr(self, name) is not None]
        if self.base is not None and photographs:
            raise SlimDiffError(f"a base model and {' and '.join(photographs)} given: calibrate the refiner either on "
                                "the base model's latents (--base) or on photographs (--images, --strength), not both")


def calibration_call(pipe, config: CalibrationConfig) -> tuple[tuple[int, int], int] | None:
    """(latent size, text tokens) of the denoiser calls the default text-to-image calibration of ``pipe`` makes
    with ``config`` — what prices a MAC budget before calibrating (:func:`slimdiff.slim.check_budget`); None when
    user images or a base model's latents decide the sizes."""
    from .export.shapes import Range

    if config.images is not None or config.base is not None:
        return None
    family = family_for(pipe)
    height, width = family.sample_size(family.denoiser(pipe).config)
    scale = pipe.vae_scale_factor
    latent = (config.height // scale if config.height else height, config.width // scale if config.width else width)
    return latent, Range.parse(family.default_text_len(pipe), "text length").opt


def pipeline_loop(pipe, config: CalibrationConfig) -> BatchLoop:
    """The default calibration loop: the pipeline's own text-to-image sampling (its family's), stopping at
    latents; one line for images or a strength given to a pipeline that takes no image, or a base model given
    to one that refines no base's latents."""
    family = family_for(pipe)
    family.check_image_size(pipe, config.height, config.width)
    given = [name for name, value in (("images", config.images), ("strength", config.strength)) if value is not None]
    if given and not family.serving_image_inputs:  # the images a request carries are those its sampling starts from
        raise SlimDiffError(f"{' and '.join(given)} given, but {type(pipe).__name__} takes no image (only "
                            "inpainting models, FLUX Control, FLUX Kontext and the SDXL refiner take one)")
    if config.strength is not None and not family.noises_image:
        raise SlimDiffError(f"strength given, but {type(pipe).__name__} noises no image: it samples from noise, "
                            "conditioned on its images")
    if config.base is None:
        return family.calibration_loop(pipe, config)

    def load_base():
        """The base pipeline of ``config.base`` (a folder, a single file, a built-in or a slim folder, loaded as
        ``--model`` is) in the denoiser's dtype, on the host."""
        from .models import load_pipeline

        try:
            return load_pipeline(config.base, family.denoiser(pipe).dtype)
        except SlimDiffError as exc:
            raise SlimDiffError(f"--base: {exc}") from None

    return family.base_calibration_loop(pipe, config, load_base)


# ----------------------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------------------


class _Accumulator:
    """Float64 sums keyed by name; per-timestep entries are rows of a (T, ...) tensor that grows as pass 1
    discovers timesteps."""

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor, t: int | None = None) -> None:
        if key not in self.sums:
            shape = value.shape if t is None else (t + 1, *value.shape)
            self.sums[key] = torch.zeros(shape, dtype=torch.float64, device=self.device)
        total = self.sums[key]
        if t is None:
            total += value
            return
        if t >= total.shape[0]:
            grow = total.new_zeros((t + 1 - total.shape[0], *total.shape[1:]))
            total = self.sums[key] = torch.cat([total, grow])
        total[t] += value


def _moment(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x


def _energy(x: torch.Tensor) -> torch.Tensor:
    return x.double().pow(2).sum()


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _head_gram(y: torch.Tensor, heads: int) -> torch.Tensor:
    """(H, d, d) token-summed Gram of each head's slice of ``y`` (..., H·d), in float64."""
    y = y.reshape(-1, heads, y.shape[-1] // heads).double()
    return torch.einsum("nhd,nhe->hde", y, y)


class _Collector:
    """Registers the hooks of one pass on a denoiser (at the points its block adapters name) and accumulates
    into an :class:`_Accumulator`, under the keys of the statistics schema. ``weights``: pass 2's timestep
    weights per site name; ``sublayers``: observe only these sub-layers (one site shard), None: all."""

    def __init__(self, unet, mode: str, timesteps: list[int] | None, weights: dict | None, visits: list[int] | None,
                 sublayers: Collection[str] | None = None):
        self.unet, self.mode = unet, mode
        self.family = family_for(unet)
        self.timesteps = list(timesteps or [])
        self.index = {t: i for i, t in enumerate(self.timesteps)}
        self.weights, self.visits = weights, visits
        self.sublayers = sublayers
        self.site_names = {(site.sublayer_path, site.kind): site.name for site in _sites(unet, sublayers)}
        self.acc = _Accumulator(unet.device)
        self.calls: dict[int, int] = {}
        self.seq: dict[str, int] = {}  # tokens per sample seen by each attention (for MAC costs), by storage key
        self.t: int | None = None
        self.call_context: torch.Tensor | None = None  # the text context of the current denoiser call
        self.context_summed = False  # whether its moment is in the shared sum yet
        self.context_shared: dict[str, bool] = {}  # per cross-attention: reads the call's context unchanged
        self.gates: dict[str, torch.Tensor] = {}  # per gated sub-layer: its gate in the current block call

    # The current timestep is read once per denoiser call; every module hook uses it.
    def _unet_pre(self, _module, args, kwargs):
        t = int(torch.as_tensor(self.family.timestep(args, kwargs)).flatten()[0])
        if self.mode == "pass1" and t not in self.index:
            self.index[t] = len(self.timesteps)
            self.timesteps.append(t)
        if t not in self.index:
            raise SlimDiffError(f"calibration visited timestep {t}, which pass 1 never saw: "
                                "both passes must run the same schedule")
        self.t = self.index[t]
        self.calls[t] = self.calls.get(t, 0) + 1
        self.call_context, self.context_summed = self.family.text_context(args, kwargs), False

    def _step_weight(self, path: str, kind: str) -> float:
        """w_{m,t} / visits_t: the weight of one denoiser call's sums in a site's weighted moment."""
        return float(self.weights[self.site_names[path, kind]][self.t]) / self.visits[self.t]

    def _ffn_hidden_pre(self, path: str, down: torch.nn.Linear):
        def hook(_m, args):
            h = args[0]
            n = _tokens(h)
            self.seq[seq_key(path)] = h.shape[-2]
            self.acc.add(FFNStatistics.key(path, "h_energy"), _energy(h), self.t)
            self.acc.add(FFNStatistics.key(path, "hout_energy"),
                         _energy(torch.nn.functional.linear(h, down.weight)), self.t)
            self.acc.add(FFNStatistics.key(path, "tokens"), torch.tensor(float(n)), self.t)
            if self.mode == "pass2":
                w = self._step_weight(path, FFN)
                self.acc.add(FFNStatistics.key(path, "moment"), w * _moment(h))
                self.acc.add(FFNStatistics.key(path, "moment_norm"), torch.tensor(float(w * n)))

        return hook

    def _attn_pre(self, path: str, tap):
        def hook(_m, args, kwargs):
            x, call_ctx = tap.read_inputs(args, kwargs)
            keep, ctx = tap.context_keep(args, kwargs), call_ctx
            if keep is not None:
                if ctx is None:
                    raise SlimDiffError(f"{path}: a masked self-attention cannot be calibrated (only the context "
                                        "tokens of a cross-attention may be masked)")
                ctx = ctx[keep]  # padding the attention never reads stays out of the context's statistics
            n = _tokens(x)
            self.seq[seq_key(path)] = x.shape[-2]
            # the query and key Grams serve the Q·K site's TRQ alone: none where queries and keys are normalised
            # per head (qk_norm, FLUX), which at FLUX.1-dev's scale would be 9 GB over 25 timesteps for nothing
            qk = (path, QK) in self.site_names
            if qk:  # projections in the model's dtype (what the model computes), their Grams in float64
                queries = torch.nn.functional.linear(x, tap.query.weight)
                self.acc.add(AttentionGrams.key(path, "q_gram"), _head_gram(queries, tap.heads), self.t)
                keys = torch.nn.functional.linear(x if ctx is None else ctx, tap.key.weight)
            self.acc.add(AttentionGrams.key(path, "input_energy"), _energy(x), self.t)
            self.acc.add(AttentionGrams.key(path, "input_tokens"), torch.tensor(float(n)), self.t)
            if ctx is None:
                if qk:
                    self.acc.add(AttentionGrams.key(path, "k_gram"), _head_gram(keys, tap.heads), self.t)
            else:  # text tokens do not depend on t: one of each per module
                self.seq[seq_key(path, context=True)] = call_ctx.shape[-2]
                if qk:
                    self.acc.add(AttentionGrams.key(path, "k_gram"), _head_gram(keys, tap.heads))
                self.acc.add(AttentionGrams.key(path, "context_energy"), _energy(ctx))
                self.acc.add(AttentionGrams.key(path, "context_tokens"), torch.tensor(float(_tokens(ctx))))
            if self.mode != "pass2":
                return
            moment = _moment(x) if tap.input_moment is None else tap.input_moment(args, kwargs)
            if qk:
                w = self._step_weight(path, QK)
                self.acc.add(AttentionStatistics.key(path, "qk_moment"), w * moment)
                self.acc.add(AttentionStatistics.key(path, "qk_sum"), w * x.reshape(-1, x.shape[-1]).double().sum(0))
                self.acc.add(AttentionStatistics.key(path, "qk_moment_norm"), torch.tensor(float(w * n)))
            if ctx is None:
                w = self._step_weight(path, VO)
                self.acc.add(AttentionStatistics.key(path, "vo_moment"), w * moment)
                self.acc.add(AttentionStatistics.key(path, "vo_moment_norm"), torch.tensor(float(w * n)))
            else:
                self._context_moment(path, call_ctx, ctx)

        return hook

    def _context_moment(self, path: str, call_ctx: torch.Tensor, ctx: torch.Tensor) -> None:
        """Sum the text-context moment of a cross-attention (``ctx``: the tokens it attends to of ``call_ctx``,
        what it was called with): once per call for all that read the call's context (the same tensor), else its
        own."""
        shared = call_ctx is self.call_context
        if self.context_shared.setdefault(path, shared) != shared:
            raise SlimDiffError(f"{path} read the denoiser's text context in some calls and not in others: "
                                "calibration cannot share its text moment")
        if not shared:
            self.acc.add(AttentionStatistics.key(path, "context"), _moment(ctx))
        elif not self.context_summed:
            self.acc.add(TextContextMoment.key(TEXT_CONTEXT, "moment"), _moment(ctx))
            self.acc.add(TextContextMoment.key(TEXT_CONTEXT, "tokens"), torch.tensor(float(_tokens(ctx))))
            self.context_summed = True

    def _attn_out_pre(self, path: str, heads: int):
        def hook(_m, args):
            self.acc.add(AttentionGrams.key(path, "z_gram"), _head_gram(args[0], heads), self.t)
            self.acc.add(AttentionGrams.key(path, "z_sum"), args[0].reshape(-1, args[0].shape[-1]).double().sum(0),
                         self.t)
            self.acc.add(AttentionGrams.key(path, "z_tokens"), torch.tensor(float(_tokens(args[0]))), self.t)

        return hook

    def _residual_pre(self, path: str):
        # a sub-layer updating several streams (a joint attention) sums over all of them
        def hook(_m, args):
            self.acc.add(ResidualEnergies.key(path, "res_energy"), _energy(args[0]), self.t)
            self.acc.add(ResidualEnergies.key(path, "res_tokens"), torch.tensor(float(_tokens(args[0]))), self.t)

        return hook

    def _update_post(self, path: str, streams: int, gated: bool):
        def hook(_m, _args, out):
            outs = out[:streams] if isinstance(out, tuple) else (out,)
            if gated:  # what the block adds to the residual stream is the gated output
                gates = self.gates.pop(path)
                outs = [o * g for o, g in zip(outs, gates if isinstance(gates, tuple) else (gates,), strict=True)]
            self.acc.add(ResidualEnergies.key(path, "upd_energy"), sum(_energy(o) for o in outs), self.t)

        return hook

    def _block_pre(self, gates: dict[str, Callable]):
        def hook(_m, args, kwargs):
            self.gates.update({path: gate(args, kwargs) for path, gate in gates.items()})

        return hook

    @staticmethod
    def _input_hook(target, hook) -> torch.utils.hooks.RemovableHandle:
        """``hook(module, args)`` on what enters ``target``: a module's input, or a column block's columns of its
        shared Linear's input."""
        if isinstance(target, ColumnBlock):
            return target.linear.register_forward_pre_hook(lambda m, args: hook(m, (target.columns(args[0]),)))
        return target.register_forward_pre_hook(hook)

    @staticmethod
    def _output_hook(target, hook) -> torch.utils.hooks.RemovableHandle:
        """``hook(module, args, output)`` on what ``target`` outputs: a module's output, or a column block's part of
        its shared Linear's output (computed from the Linear's input)."""
        if isinstance(target, ColumnBlock):
            return target.linear.register_forward_pre_hook(lambda m, args: hook(m, args, target(args[0])))
        return target.register_forward_hook(hook)

    @contextmanager
    def attached(self) -> Iterator["_Collector"]:
        handles = [self.unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True)]
        for path, block, adapter in transformer_blocks(self.unet):
            taps = [tap for tap in adapter.taps(block)
                    if self.sublayers is None or f"{path}.{tap.sublayer}" in self.sublayers]
            gates = {f"{path}.{tap.sublayer}": tap.gate for tap in taps if tap.gate is not None}
            if gates and self.mode == "pass2":
                handles.append(block.register_forward_pre_hook(self._block_pre(gates), with_kwargs=True))
            for tap in taps:
                sub = f"{path}.{tap.sublayer}"
                if tap.kind == FFN:
                    handles.append(self._input_hook(tap.hidden, self._ffn_hidden_pre(sub, tap.hidden)))
                if tap.kind == ATTENTION:
                    handles.append(tap.attention.register_forward_pre_hook(self._attn_pre(sub, tap), with_kwargs=True))
                    handles.extend(self._input_hook(out, self._attn_out_pre(sub, tap.heads))
                                   for out in tap.head_outputs)
                if self.mode == "pass2":  # the propagation factor of the module scores
                    handles.extend(res.register_forward_pre_hook(self._residual_pre(sub)) for res in tap.residuals)
                    handles.append(self._output_hook(
                        tap.update, self._update_post(sub, tap.update_streams, tap.gate is not None)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def state(self) -> dict[str, torch.Tensor]:
        """The sums, where they were accumulated (the caller folds them into the host total one by one)."""
        state = dict(self.acc.sums)
        state.update({k: torch.tensor(float(v), dtype=torch.float64) for k, v in self.seq.items()})
        return state


# ----------------------------------------------------------------------------------------------------------
# The resumable two-pass driver
# ----------------------------------------------------------------------------------------------------------


def _prior(n: int, kind: str) -> torch.Tensor:
    if kind == "uniform":
        return torch.ones(n, dtype=torch.float64)
    # early steps come first in sampling order; their errors pass through more later updates
    return torch.log(torch.arange(n, 0, -1, dtype=torch.float64) + 1.0)


def weight64(module: torch.nn.Linear) -> torch.Tensor:
    """A Linear's weight as a float64 CPU tensor (what the TRQs and the closed-form factors compute with)."""
    return module.weight.detach().double().cpu()


def site_trq(unet, site, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """ρ_{m,t} of one site at every timestep (method.md §5.1), from the per-timestep statistics in ``tensors``
    (pass 1's, or pass 2's over every prompt)."""
    lin = site_linears(unet, site)
    if site.kind == FFN:
        energies = FFNEnergies.read(tensors, site.sublayer_path)
        down = weight64(lin.down)
        return trq_from_energies(energies.hout_energy / energies.tokens, energies.h_energy / energies.tokens,
                                 down.pow(2).sum(), down.shape[1])
    grams = AttentionGrams.read(tensors, site.sublayer_path)
    if site.kind == QK:
        return trq_qk(weight64(lin.q), weight64(lin.k), grams.query_grams, grams.key_grams, grams.input_traces,
                      grams.key_input_traces, site.heads)
    return trq_vo(weight64(lin.out), grams.output_grams, site.heads)


def fidelity_weights(rho: torch.Tensor, config: CalibrationConfig) -> torch.Tensor:
    """w_{m,t} over one site's timesteps, following ``config.weighting``."""
    n = rho.shape[-1]
    if config.weighting == "uniform":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if config.weighting == "single":
        w = torch.zeros(n, dtype=torch.float64)
        w[n // 2] = 1.0
        return w
    return timestep_weights(rho, gamma=config.gamma, prior=_prior(n, config.prior))


def _sites(unet, sublayers: Collection[str] | None) -> list:
    """The denoiser's sites, or those of the given sub-layers (a site shard)."""
    return [site for site in module_sites(unet) if sublayers is None or site.sublayer_path in sublayers]


def site_timestep_weights(pass1: Mapping[str, torch.Tensor], unet, config: CalibrationConfig,
                          sublayers: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """w_{m,t} for every site (by site name; only those of ``sublayers`` when given) from the pass-1 statistics."""
    return {site.name: fidelity_weights(site_trq(unet, site, pass1), config) for site in _sites(unet, sublayers)}


class StoredTensors(Mapping[str, torch.Tensor]):
    """The tensors of a statistics directory, read from its files on access and never all at once: an FFN
    moment of FLUX.1 is 1.2 GB, its statistics 105 GB, and slimming needs one site's at a time. Each key is
    ``<prefix><name in its file>`` of one file (pass 1's under ``pass1.``); a key stored by several site shards
    (the shared text moment) is read from the first. A file is opened for each read and closed after it: its
    memory map would otherwise keep every page read so far in the process's resident memory."""

    def __init__(self, files: Sequence[tuple[Path, str]]):
        self._where: dict[str, tuple[Path, str]] = {}
        for path, prefix in files:
            with safe_open(str(path), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    self._where.setdefault(prefix + name, (path, name))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        path, name = self._where[key]
        with safe_open(str(path), "pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@dataclass
class Statistics:
    """Everything calibration measured; input of analysis and decomposition."""

    tensors: Mapping[str, torch.Tensor]  # pass-2 sums, plus "pass1.<key>" statistics
    timesteps: list[int]
    visits: list[int]
    timestep_weights: dict[str, torch.Tensor]  # w_{m,t} by site name, from pass 1
    fingerprint: str
    config: CalibrationConfig
    num_prompts: int

    def ffn(self, sublayer_path: str) -> FFNStatistics:
        """The typed pass-2 statistics of the FFN at ``sublayer_path`` (a site's ``sublayer_path``)."""
        return FFNStatistics.read(self.tensors, sublayer_path)

    def attention(self, sublayer_path: str) -> AttentionStatistics:
        """The typed pass-2 statistics of the attention at ``sublayer_path``."""
        return AttentionStatistics.read(self.tensors, sublayer_path)

    def adopted_by(self, fingerprint: str) -> "Statistics":
        """These statistics, accepted for the model of ``fingerprint`` although another model's weights were
        hashed when they were collected (:func:`slimdiff.lora.fuse_loras_onto_statistics`: the model without the
        LoRAs fused into this one)."""
        return replace(self, fingerprint=fingerprint)

    def check_model(self, unet) -> None:
        if site_weights_fingerprint(unet) != self.fingerprint:
            raise SlimDiffError("these statistics were collected from a different model "
                                "(fingerprint mismatch): calibrate this model first")
        missing = sorted({s.name for s in module_sites(unet)} - set(self.timestep_weights))
        if missing:  # a site shard's folder alone, or a shard missing from the shards' folder
            raise SlimDiffError(f"these statistics cover {len(self.timestep_weights)} of the model's sites "
                                f"(none of {missing[0]} and {len(missing) - 1} more): load the folder holding "
                                f"every site shard ({SHARDS_FILE})")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Statistics":
        """The statistics in ``folder``: one calibration's, or every site shard's (a folder with
        ``shards.json``). Tensors stay on disk until read (:class:`StoredTensors`); every one is checked once here,
        one at a time, for NaN or Inf."""
        folder = Path(folder)
        shards = _read_shards(folder)
        parts = [folder] if shards is None else [folder / _shard_dir(i, len(shards["shards"]))
                                                 for i in range(len(shards["shards"]))]
        manifests = []
        for part in parts:
            manifest = _read_manifest(part)
            if manifest is None:
                raise SlimDiffError(f"{str(part)!r} is not a statistics directory (no {MANIFEST})")
            if not manifest.get("complete"):
                raise SlimDiffError(f"statistics in {str(part)!r} are incomplete: rerun `slimdiff calibrate` "
                                    "with the same arguments to resume")
            manifests.append(manifest)
        first = manifests[0]
        for part, manifest in zip(parts[1:], manifests[1:]):
            for key in ("fingerprint", "config", "num_prompts", "prompts_sha256", "timesteps", "visits"):
                if manifest.get(key) != first.get(key):
                    raise SlimDiffError(f"site shard {str(part)!r} was calibrated with other {key.replace('_', ' ')} "
                                        f"than {str(parts[0])!r}: calibrate its shards with the same arguments")
        try:
            files = [(part / m[stage]["file"], prefix) for part, m in zip(parts, manifests)
                     for stage, prefix in (("pass2", ""), ("pass1", "pass1."))]
            tensors = StoredTensors(files)
            weights = {}
            for part in parts:
                weights.update(load_file(str(part / WEIGHTS_FILE)))
        except Exception as exc:
            raise SlimDiffError(f"corrupt statistics directory {str(folder)!r}: {exc}") from exc
        for key in tensors:
            if not torch.isfinite(tensors[key]).all():  # e.g. an fp16 overflow: the factors would all be NaN
                raise SlimDiffError(f"statistics in {str(folder)!r} hold NaN or Inf values (first in {key}): "
                                    "calibrate again (in float32 if it ran in float16)")
        bad = next((k for k, v in weights.items() if not torch.isfinite(v).all()), None)
        if bad is not None:
            raise SlimDiffError(f"statistics in {str(folder)!r} hold NaN or Inf values (first in {bad}): "
                                "calibrate again (in float32 if it ran in float16)")
        return cls(tensors, first["timesteps"], first["visits"], weights, first["fingerprint"],
                   CalibrationConfig(**first["config"]), first["num_prompts"])


def _shard_dir(index: int, count: int) -> str:
    return f"shard-{index}-of-{count}"


def _read_json(path: Path, what: str) -> dict | None:
    """The JSON object in ``path`` (a ``what``), or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SlimDiffError(f"corrupt {what} {str(path)!r}: {exc}") from exc


def _read_shards(folder: Path) -> dict | None:
    shards = _read_json(folder / SHARDS_FILE, "site-shard list")
    if shards is not None and shards.get("format") != SHARDS_FORMAT:
        raise SlimDiffError(f"{str(folder / SHARDS_FILE)!r} is not a slimdiff site-shard list (format {SHARDS_FORMAT})")
    return shards


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    manifest = _read_json(path, "statistics manifest")
    if manifest is None:
        return None
    if manifest.get("format") != STATS_FORMAT:
        if str(manifest.get("format", "")).startswith("slimdiff-stats/"):
            raise SlimDiffError(f"statistics in {str(folder)!r} were collected by another slimdiff version "
                                f"(format {manifest['format']}, this one reads {STATS_FORMAT}): calibrate again")
        raise SlimDiffError(f"{str(path)!r} is not a slimdiff statistics manifest")
    return manifest


def _atomic_json(path: Path, body: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
    os.replace(tmp, path)


class _Checkpointer:
    """Writes accumulators then the manifest that points at them; a crash between leaves the old pair valid."""

    def __init__(self, folder: Path | None, manifest: dict):
        self.folder, self.manifest = folder, manifest

    def save(self, stage: str, tensors: dict[str, torch.Tensor], batches_done: int, **extra) -> None:
        if self.folder is None:
            return
        name = f"{stage}-{batches_done:06d}.safetensors"
        tmp = self.folder / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.folder / name)
        old = self.manifest.get(stage, {}).get("file")
        self.manifest[stage] = {"file": name, "batches_done": batches_done}
        self.manifest.update(extra)
        _atomic_json(self.folder / MANIFEST, self.manifest)
        if old and old != name:
            (self.folder / old).unlink(missing_ok=True)


def _site_bytes(unet, site, timesteps: int, shared: bool) -> tuple[dict[str, int], int | None]:
    """The float64 entries of one site's statistics by kind, its shared text moment left out, and the width of the
    shared text context it reads (None if it reads none)."""
    sizes = {"attention_grams_per_timestep": 0, "attention_moments": 0, "text_moments": 0, "ffn_moments": 0}
    lin = site_linears(unet, site)
    text_width = None
    if site.kind == FFN:
        sizes["ffn_moments"] += lin.down.in_features ** 2
    elif site.kind == QK:
        gram = site.heads * (lin.q.out_features // site.heads) ** 2
        sizes["attention_moments"] += lin.q.in_features ** 2
        if site.attention == CROSS:
            sizes["attention_grams_per_timestep"] += timesteps * gram + gram
            if shared:
                text_width = lin.k.in_features
            else:
                sizes["text_moments"] += lin.k.in_features ** 2
        else:
            sizes["attention_grams_per_timestep"] += 2 * timesteps * gram
    else:
        sizes["attention_grams_per_timestep"] += timesteps * site.heads * (lin.out.in_features // site.heads) ** 2
        if site.attention != CROSS:
            sizes["attention_moments"] += lin.v.in_features ** 2
    return sizes, text_width


def statistics_bytes(unet, timesteps: int, sublayers: Collection[str] | None = None) -> dict[str, int]:
    """Bytes of the float64 statistics a calibration of ``unet`` over ``timesteps`` distinct timesteps holds (the
    scalars beside them are negligible): per-timestep per-head Grams of each attention's queries, keys (self-
    attention; a cross-attention's text keys have one) and head outputs (H×d×d), the timestep-weighted input
    moments of each attention (C×C for Q·K, once more for V·O of a self-attention), one moment of the text
    context the cross-attentions share (one per cross-attention in a family whose cross-attentions read a
    projection of it, PixArt), and one I×I moment per FFN. ``sublayers``: only the statistics of these sub-layers
    (one site shard's), the shared text moment counted once if any of them reads it."""
    sizes = {"attention_grams_per_timestep": 0, "attention_moments": 0, "text_moments": 0, "ffn_moments": 0}
    shared = family_for(unet).shares_text_context  # one moment of the denoiser's text context for all
    text_widths: set[int] = set()
    for site in _sites(unet, sublayers):
        own, text_width = _site_bytes(unet, site, timesteps, shared)
        sizes = {k: v + own[k] for k, v in sizes.items()}
        if text_width is not None:
            text_widths.add(text_width)
    sizes["text_moments"] += sum(width ** 2 for width in text_widths)
    return {k: 8 * v for k, v in sizes.items()}


def _memory_needs(unet, need: int, processes: int) -> dict[str, int]:
    """Bytes of each memory (device name or "cpu" for the host) that ``need`` bytes of statistics take. They
    accumulate on the UNet's device; the host holds the running total, and a chunk's sums are folded into it one
    tensor at a time — so the host holds them once on a single GPU, twice when the accumulators are on the host
    too (a CPU run) or when another process's chunk arrives whole (torchrun)."""
    device = str(next(unet.parameters()).device)
    host = 2 * need if device == "cpu" or processes > 1 else need
    return {"cpu": host} if device == "cpu" else {device: need, "cpu": host}


def _shortfall(unet, need: int, processes: int) -> tuple[str, int, int] | None:
    """(memory, bytes needed, bytes available) of the first memory that cannot hold ``need`` bytes of statistics,
    or None when they fit."""
    from .devices import available_memory_bytes

    for where, amount in _memory_needs(unet, need, processes).items():
        available = available_memory_bytes(where)
        if available is not None and amount > available:
            return where, amount, available
    return None


def check_statistics_fit(unet, timesteps: int, processes: int = 1,
                         sublayers: Collection[str] | None = None) -> None:
    """Refuse, before the first prompt, a calibration (or one site shard of it: ``sublayers``) whose statistics
    cannot be held."""
    sizes = statistics_bytes(unet, timesteps, sublayers)
    need = sum(sizes.values())
    short = _shortfall(unet, need, processes)
    if short is None:
        return
    where, amount, available = short
    parts = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.1f} GB" for k, v in sizes.items())
    what = "this UNet" if sublayers is None else f"this site shard ({len(sublayers)} sub-layers)"
    raise SlimDiffError(
        f"calibration statistics of {what} over {timesteps} timesteps are {need / 1e9:.1f} GB of float64 "
        f"moments ({parts}) and need {amount / 1e9:.1f} GB of {'host' if where == 'cpu' else 'GPU'} "
        f"memory; {available / 1e9:.1f} GB are available — calibrate in site shards to a statistics directory "
        f"(`slimdiff calibrate --site-shards auto`: each shard samples every prompt again for a share of the "
        f"sites), with fewer --steps (the per-timestep parts scale with them) or on a machine with more memory")


def check_disk_room(unet, folder: Path, timesteps: int, shards: list[list[str]] | None = None,
                    processes: int = 1) -> None:
    """Refuse, before the first prompt, a calibration whose checkpoints will not fit on ``folder``'s file system
    (a full disk would otherwise end it at its first large checkpoint, after the sampling it spent). On disk: each
    shard's pass-1 Grams and statistics; while a checkpoint replaces the last one, both (the larger shard's); under
    torchrun, the other ranks' finished chunks (each as large) until rank 0 folds them. A resumed run's checkpoints
    count as room, as it replaces them."""
    need, largest = 0, 0
    for group in [None] if shards is None else shards:
        sizes = statistics_bytes(unet, timesteps, group)
        total = sum(sizes.values())
        need += sizes["attention_grams_per_timestep"] + total
        largest = max(largest, total)
    need += largest * processes  # the checkpoint being replaced, and the other ranks' chunks
    held = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    free = shutil.disk_usage(folder).free
    if need > free + held:
        raise SlimDiffError(f"calibration checkpoints need about {need / 1e9:.1f} GB on the file system of "
                            f"{str(folder)!r} at their peak, and it has {(free + held) / 1e9:.1f} GB free: free some "
                            "space, --out on another disk, or fewer --steps (the per-timestep Grams scale with them)")


# ----------------------------------------------------------------------------------------------------------
# Site shards: statistics too large for one machine's memory, collected a share of the sub-layers at a time
# ----------------------------------------------------------------------------------------------------------

SHARDS_FILE = "shards.json"
SHARDS_FORMAT = "slimdiff-stats-shards/1"


class _ShardSizes:
    """Statistics bytes of each sub-layer with a site (in the denoiser's order), counted once, and of any group of
    them: a shard holds its sub-layers' own statistics and, once, each shared text moment they read."""

    def __init__(self, unet, timesteps: int):
        shared = family_for(unet).shares_text_context
        self.own: dict[str, int] = {}
        self.text_widths: dict[str, set[int]] = {}
        for site in module_sites(unet):
            own, text_width = _site_bytes(unet, site, timesteps, shared)
            self.own[site.sublayer_path] = self.own.get(site.sublayer_path, 0) + 8 * sum(own.values())
            widths = self.text_widths.setdefault(site.sublayer_path, set())
            if text_width is not None:
                widths.add(text_width)

    def of(self, group: Collection[str]) -> int:
        return sum(self.own[p] for p in group) + 8 * sum(w ** 2 for w in set().union(*(self.text_widths[p]
                                                                                        for p in group)))

    def balanced(self, count: int) -> list[list[str]]:
        """``count`` disjoint groups of the sub-layers, largest first onto the lightest shard (deterministic for a
        given model), each in the denoiser's order."""
        if not 1 <= count <= len(self.own):
            raise SlimDiffError(f"--site-shards must be between 1 and {len(self.own)} (this denoiser's sub-layers "
                                f"with sites), got {count}")
        order = {path: i for i, path in enumerate(self.own)}
        loads, members = [0] * count, [[] for _ in range(count)]
        for path in sorted(self.own, key=lambda p: (-self.own[p], order[p])):
            lightest = min(range(count), key=lambda i: (loads[i], i))
            loads[lightest] += self.own[path]
            members[lightest].append(path)
        return [sorted(group, key=order.__getitem__) for group in members]


def plan_site_shards(unet, timesteps: int, count: int) -> list[list[str]]:
    """``count`` disjoint groups of the sub-layers with sites, balanced by the bytes of their statistics."""
    return _ShardSizes(unet, timesteps).balanced(count)


def site_shards_for(unet, timesteps: int, shards: int | str, processes: int = 1) -> list[list[str]] | None:
    """The site shards a calibration runs: None for one run over every site, else the sub-layers of each shard.
    ``shards``: a count, or ``"auto"`` — the fewest shards whose statistics each fit in memory (one if they all
    do). Refuses, before any prompt, shards that do not fit."""
    sizes = _ShardSizes(unet, timesteps)
    if shards == "auto":
        if _shortfall(unet, sizes.of(sizes.own), processes) is None:
            return None
        for count in range(2, len(sizes.own) + 1):
            plan = sizes.balanced(count)
            if all(_shortfall(unet, sizes.of(group), processes) is None for group in plan):
                return plan
        shards = len(sizes.own)  # not even one sub-layer at a time fits: refused below, naming the largest
    if not isinstance(shards, int):
        raise SlimDiffError(f"site shards must be a count or 'auto', got {shards!r}")
    if shards == 1:
        check_statistics_fit(unet, timesteps, processes)
        return None
    plan = sizes.balanced(shards)
    check_statistics_fit(unet, timesteps, processes, max(plan, key=sizes.of))
    return plan


#: The most steps guidance-distilled (LCM) models are sampled at.
LCM_MAX_STEPS = 8


def _warn_if_step_distilled(unet, config: CalibrationConfig) -> None:
    """One warning line for an LCM UNet calibrated at more steps than such models sample: the statistics would weight
    timesteps the model is never used at (the calibration still runs: the steps are the user's choice)."""
    if unet.config.get("time_cond_proj_dim") and config.steps > LCM_MAX_STEPS:
        warnings.warn(f"this UNet embeds the guidance scale (an LCM model, sampled in 2-{LCM_MAX_STEPS} steps): "
                      f"calibrating at {config.steps} steps weights timesteps it is not used at; pass the steps it "
                      "samples at (--steps 4)", SlimDiffWarning, stacklevel=3)


def calibrate(
    pipe,
    prompts: Sequence[str],
    out: str | os.PathLike | None = None,
    config: CalibrationConfig = CalibrationConfig(),
    loop: BatchLoop | None = None,
    progress: bool = True,
    on_batch: Callable[[str, int], None] | None = None,
    group: Group = Group(),
    site_shards: int | str = 1,
) -> Statistics | None:
    """Collect calibration statistics for ``pipe.unet`` over ``prompts``; resumable when ``out`` is given.

    ``loop(prompts, seeds)`` runs sampling for one batch (default: :func:`pipeline_loop`); replace it to
    calibrate on your own trajectories. ``on_batch(stage, batches_done)`` is called once a batch's sums are
    checkpointed. ``group``: the processes calibrating together (:func:`slimdiff.distributed.process_group`);
    rank 0 returns the statistics and writes ``out``, the other ranks return None.

    Prompts are summed in chunks of ``config.checkpoint_every`` batches, each chunk from zero, and the chunk
    sums are added in chunk order. Float64 addition is not associative, so this fixed tree is what makes the
    result independent of how many processes share the chunks (round-robin) and of where a run resumed.

    ``site_shards``: statistics too large for memory (FLUX.1's are 105 GB) are collected a share of the
    sub-layers at a time — N shards, or ``"auto"`` for the fewest that fit — each a complete two-pass run over
    every prompt (N× the sampling) into ``out/shard-K-of-N/``; every site's sums are the same operations in the
    same order as in one run, so the statistics are bit-identical to an unsharded calibration's. They are read
    back from disk (:meth:`Statistics.load`) a site at a time.
    """
    if not prompts:
        raise SlimDiffError("no calibration prompts")
    # a pipeline, or a bare denoiser driven by the caller's loop
    unet = pipe if isinstance(pipe, torch.nn.Module) else family_for(pipe).denoiser(pipe)
    if loop is None:
        if unet is pipe:
            raise SlimDiffError("calibrating a bare denoiser needs a sampling loop (loop=...)")
        loop = pipeline_loop(pipe, config)
    if group.is_leader:
        _warn_if_step_distilled(unet, config)
    folder = Path(out) if out is not None else None
    with _sole_writer(folder if group.is_leader else None):
        return _calibrate_into(unet, prompts, folder, config, loop, progress, on_batch, group, site_shards)


@contextmanager
def _sole_writer(folder: Path | None) -> Iterator[None]:
    """Hold ``folder`` for one calibration at a time (an exclusive ``flock`` on the folder itself, released when
    the process ends however it ends): a second run into it — a scheduler's retry while the first still runs —
    would checkpoint over the first one's files. A folder made here and left empty is removed again."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no advisory locks to take
        fcntl = None
    if folder is None or fcntl is None:
        yield
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Complete statistics are only read again (two jobs reusing one folder at once): nothing to guard.
            if not (_read_manifest(folder) or {}).get("complete"):
                raise SlimDiffError(f"{str(folder)!r} is being written by another calibration now: wait for it to "
                                    "end (rerun then to resume it, if it stopped), or use another --out") from None
        except OSError:  # a file system without locks (some network and FUSE mounts): calibrate unguarded
            pass
        yield
    finally:
        os.close(handle)
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _calibrate_into(unet, prompts: Sequence[str], folder: Path | None, config: CalibrationConfig, loop: BatchLoop,
                    progress: bool, on_batch: Callable[[str, int], None] | None, group: Group,
                    site_shards: int | str) -> Statistics | None:
    """:func:`calibrate` once the folder is this run's: unsharded, or site shard after site shard."""
    plan = site_shards_for(unet, config.steps, site_shards, group.size)
    if folder is not None and group.is_leader:
        check_disk_room(unet, folder, config.steps, plan, group.size)
    if plan is None:
        if folder is not None and group.is_leader and _read_shards(folder) is not None:
            raise SlimDiffError(f"{str(folder)!r} holds site shards ({SHARDS_FILE}): rerun with the same "
                                "--site-shards, or use another --out")
        return _calibrate_sites(unet, prompts, folder, config, loop, progress, on_batch, group, None,
                                site_weights_fingerprint(unet))
    if folder is not None and group.is_leader and _read_manifest(folder) is not None:
        raise SlimDiffError(f"{str(folder)!r} holds the statistics of an unsharded calibration; use another "
                            "--out for site shards")
    if folder is None:
        raise SlimDiffError(f"statistics calibrated in {len(plan)} site shards are written to disk and read back a "
                            "site at a time: give an output directory (`slimdiff calibrate --out DIR`)")
    fingerprint = site_weights_fingerprint(unet)
    if group.is_leader:
        body = {"format": SHARDS_FORMAT, "fingerprint": fingerprint, "shards": plan}
        known = _read_shards(folder)
        if known is not None and known != body:
            raise SlimDiffError(f"{str(folder)!r} holds other site shards (another model or --site-shards); rerun "
                                "with the same arguments, or use another --out")
        if known is None:
            if folder.exists() and any(p.name != "slimset.json" for p in folder.iterdir()):
                raise SlimDiffError(f"{str(folder)!r} exists and is not a statistics directory")
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_json(folder / SHARDS_FILE, body)
    group.barrier()
    for index, sublayers in enumerate(plan):
        _calibrate_sites(unet, prompts, folder / _shard_dir(index, len(plan)), config, loop, progress, on_batch,
                         group, {"index": index, "count": len(plan), "sublayers": sublayers}, fingerprint)
    return Statistics.load(folder) if group.is_leader else None


def _calibrate_sites(unet, prompts: Sequence[str], folder: Path | None, config: CalibrationConfig, loop: BatchLoop,
                     progress: bool, on_batch: Callable[[str, int], None] | None, group: Group,
                     shard: dict | None, fingerprint: str) -> Statistics | None:
    """One two-pass calibration of every site, or of one site shard's sub-layers (``shard``: its index, the
    shard count and its sub-layers; recorded in the manifest, so a resumed shard is the same shard).
    ``fingerprint``: the model's (:func:`~slimdiff.families.site_weights_fingerprint`: it hashes every site weight,
    so it is computed once)."""
    sublayers = None if shard is None else set(shard["sublayers"])
    prompt_sha = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    fresh = {"format": STATS_FORMAT, "fingerprint": fingerprint, "config": asdict(config),
             "num_prompts": len(prompts), "prompts_sha256": prompt_sha, "complete": False}
    if shard is not None:
        fresh["site_shard"] = shard
    run_id = json.dumps(fresh, sort_keys=True)
    group.check_same("model, prompts and calibration arguments", run_id)
    manifest = None
    if group.is_leader:
        manifest = _resume_manifest(folder, fresh) if folder is not None else None
        if manifest is None:
            manifest = fresh
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
                _atomic_json(folder / MANIFEST, manifest)
    manifest = group.broadcast_json(manifest)  # every rank resumes where rank 0's checkpoint says
    chunks_dir = None
    if folder is not None and group.size > 1:
        chunks_dir = folder / "chunks"
        chunks_dir.mkdir(parents=True, exist_ok=True)
    label = "" if shard is None else f"site shard {shard['index'] + 1}/{shard['count']}: "
    run = _Run(unet, prompts, [config.seed + i for i in range(len(prompts))], loop, config, group,
               _Checkpointer(folder, manifest) if group.is_leader else None, chunks_dir,
               hashlib.sha256(run_id.encode()).hexdigest(), progress, on_batch, sublayers, label)
    batches = [list(range(i, min(i + config.batch_size, len(prompts)))) for i in range(0, len(prompts), config.batch_size)]
    n1 = -(-min(config.pass1_prompts, len(prompts)) // config.batch_size)

    pass1, trajectory = run.one_pass("pass1", batches[:n1], manifest, None, None, None)
    # Pass 2 needs the pass-1 totals of all ranks: rank 0 derives the timestep weights and shares them.
    weights = None
    if group.is_leader:
        weights = site_timestep_weights(pass1, unet, config, sublayers)
        if folder is not None and not manifest.get("complete"):  # complete: another job may be reading it
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / WEIGHTS_FILE))
    trajectory = group.broadcast_json(trajectory)
    weights = group.broadcast_tensors(weights)
    timesteps, visits = trajectory["timesteps"], trajectory["visits"]
    pass2, _ = run.one_pass("pass2", batches, manifest, timesteps, weights, visits)
    if group.is_leader and not manifest.get("complete"):  # complete statistics read again: nothing is written
        manifest["complete"] = True
        if folder is not None:
            _atomic_json(folder / MANIFEST, manifest)
    group.barrier()
    if chunks_dir is not None:
        shutil.rmtree(chunks_dir, ignore_errors=True)  # every chunk is in the totals now
    if not group.is_leader:
        return None
    tensors = dict(pass2)
    tensors.update({f"pass1.{k}": v for k, v in pass1.items()})
    return Statistics(tensors, timesteps, visits, weights, fingerprint, config, len(prompts))


def _resume_manifest(folder: Path, fresh: dict) -> dict | None:
    manifest = _read_manifest(folder)
    if manifest is None:
        if folder.exists() and any(p.name != "slimset.json" for p in folder.iterdir()):
            raise SlimDiffError(f"{str(folder)!r} exists and is not a statistics directory")
        return None
    if manifest["fingerprint"] != fresh["fingerprint"]:
        raise SlimDiffError(f"statistics in {str(folder)!r} belong to a different model; use another --out")
    # fields added to the configuration since the manifest was written take their defaults, which sample as
    # before: a calibration an older version started resumes
    recorded = {**manifest, "config": {**asdict(CalibrationConfig()), **manifest.get("config", {})}}
    for key in ("config", "num_prompts", "prompts_sha256", "site_shard"):
        if recorded.get(key) != fresh.get(key):
            raise SlimDiffError(f"statistics in {str(folder)!r} were collected with different {key.replace('_', ' ')}; "
                                "use another --out or the same arguments")
    return manifest


def _fold(total: dict[str, torch.Tensor] | None, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total += part`` on the host, key by key, so a chunk on the GPU crosses over one tensor at a time.
    ``<key>.seq`` entries are tokens per sample (constants), the rest sums."""
    total = {} if total is None else total
    for key, value in part.items():
        if key in total and not key.endswith("." + SEQ):
            total[key] += value.cpu()
        else:
            total[key] = value.to("cpu", copy=True)
    return total


class _Run:
    """One calibration's passes: chunks of batches dealt round-robin over the ranks, rank 0 folding each
    round's chunk sums in chunk order and checkpointing the total; a rank keeps a finished chunk on disk
    until the round's total is checkpointed, so a killed rank's restart loses at most its current chunk."""

    def __init__(self, unet, prompts, seeds, loop, config, group, ckpt, chunks_dir, run_id, progress, on_batch,
                 sublayers, label):
        self.unet, self.prompts, self.seeds, self.loop, self.config = unet, prompts, seeds, loop, config
        self.group, self.ckpt, self.chunks_dir, self.run_id = group, ckpt, chunks_dir, run_id
        self.progress, self.on_batch = progress, on_batch
        self.sublayers, self.label = sublayers, label  # one site shard's sub-layers (None: all), its bar prefix

    def one_pass(self, stage, batches, manifest, timesteps, weights, visits):
        """The pass's totals and, for pass 1, the trajectory ``{"timesteps", "visits"}`` (None off rank 0)."""
        size, rank = self.group.size, self.group.rank
        chunks = [batches[i:i + self.config.checkpoint_every]
                  for i in range(0, len(batches), self.config.checkpoint_every)]
        ends = [chunk[-1][-1] + 1 for chunk in chunks]  # prompts done once a chunk is folded
        batch_ends = [sum(len(c) for c in chunks[:i + 1]) for i in range(len(chunks))]
        done = sum(1 for e in batch_ends if e <= manifest.get(stage, {}).get("batches_done", 0))
        total, trajectory = None, None
        if self.group.is_leader and done:
            total = load_file(str(self.ckpt.folder / manifest[stage]["file"]))
        if stage == "pass1" and done:
            trajectory = {"timesteps": manifest["timesteps"], "visits": manifest["visits"]}
        desc = self.label + ("calibration pass 1/2 (timestep weights)" if stage == "pass1"
                             else "calibration pass 2/2 (moments)")
        bar = tqdm(total=ends[-1], initial=ends[done - 1] if done else 0, desc=desc, unit="prompt",
                   disable=not (self.progress and self.group.is_leader))
        for first in range(done, len(chunks), size):
            mine = first + rank
            last = min(first + size, len(chunks))
            part = self._chunk(stage, mine, chunks[mine], timesteps, weights, visits) if mine < last else None
            if self.group.is_leader:
                for index in range(first, last):
                    sums, meta = part if index == mine else self.group.recv(index - first)
                    if stage == "pass1":
                        if trajectory is None:
                            trajectory = meta
                        elif meta["timesteps"] != trajectory["timesteps"]:
                            raise SlimDiffError("calibration prompts visited different timesteps: "
                                                "every sampling run must follow the same schedule")
                    total = _fold(total, sums)
                    sums = None
                self.ckpt.save(stage, total, batch_ends[last - 1], **(trajectory if stage == "pass1" else {}))
                bar.update(ends[last - 1] - (ends[first - 1] if first else 0))
            elif part is not None:
                self.group.send(*part, dst=0)
            self.group.barrier()  # rank 0's checkpoint holds this round: finished chunks may go
            if part is not None:
                part = None  # the device sums are in the total: free them before the next chunk accumulates
                if self.chunks_dir is not None:
                    self._chunk_path(stage, mine).unlink(missing_ok=True)
                if self.on_batch is not None:
                    for b in range(batch_ends[mine] - len(chunks[mine]), batch_ends[mine]):
                        self.on_batch(stage, b + 1)
        bar.close()
        return total, trajectory

    def _chunk_path(self, stage: str, index: int) -> Path:
        return self.chunks_dir / f"{stage}-{index:06d}.safetensors"

    def _chunk(self, stage, index, batches, timesteps, weights, visits) -> tuple[dict[str, torch.Tensor], dict]:
        """The sums of one chunk, started from zero, and its trajectory: from disk if this rank finished it
        before a restart, else sampled (and kept on disk until folded, when other ranks share the run)."""
        path = self._chunk_path(stage, index) if self.chunks_dir is not None else None
        if path is not None and path.is_file():
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
                if header.get("run") == self.run_id:
                    return {k: f.get_tensor(k) for k in f.keys()}, json.loads(header["meta"])
        collector = _Collector(self.unet, stage, timesteps, weights, visits, self.sublayers)
        meta: dict = {}
        with torch.no_grad(), collector.attached():
            for i, batch in enumerate(batches):
                self.loop([self.prompts[j] for j in batch], [self.seeds[j] for j in batch])
                if stage == "pass1" and i == 0:  # UNet calls per timestep in one sampling run
                    meta["visits"] = [collector.calls[t] for t in collector.timesteps]
        if stage == "pass1":
            meta["timesteps"] = collector.timesteps
        sums = collector.state()
        if path is not None:
            tmp = path.with_name(path.name + ".tmp")
            save_file({k: v.cpu().contiguous() for k, v in sums.items()}, str(tmp),
                      metadata={"run": self.run_id, "meta": json.dumps(meta)})
            os.replace(tmp, path)
        return sums, meta
