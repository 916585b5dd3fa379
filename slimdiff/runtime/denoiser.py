"""The base of the engine-backed denoisers (:class:`EngineDenoiser`): what ``EngineUNet`` (:mod:`.unet`),
``EnginePixArtTransformer`` (:mod:`.pixart`), ``EngineSD3Transformer`` (:mod:`.sd3`) and ``EngineFluxTransformer``
(:mod:`.flux`) share — loading, the config and properties pipelines read, device moves, shape checks and the locked
engine run."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import torch

from ..engines import load_engine_meta, open_engine
from ..errors import SlimDiffError
from ..export.shapes import Profile
from ..families.base import REFERENCE_HEIGHT, REFERENCE_WIDTH


#: The model family of engines whose metadata does not record one (written before SD3 engines existed): every
#: UNet engine is driven alike, and PixArt's was the only transformer.
_UNRECORDED_FAMILY = {"unet": "sd", "transformer": "pixart"}


def engine_family(meta: dict) -> str | None:
    """The model family (:attr:`slimdiff.families.DenoiserFamily.name`) an engine was exported from."""
    return meta.get("family") or _UNRECORDED_FAMILY.get(meta.get("component"))


def config_differences(engine_config: dict, config) -> list[str]:
    """``"key engine-value vs value"`` for each architecture key (a slim model's rank plan left out) where an engine's
    recorded config and a model's differ."""
    from ..engines.base import SLIM_CONFIG_KEYS

    keys = [k for k in sorted(set(engine_config) | set(config))
            if not k.startswith("_") and k not in SLIM_CONFIG_KEYS
            and json.dumps(engine_config.get(k), default=str) != json.dumps(config.get(k), default=str)]
    return [f"{k} {engine_config.get(k)!r} vs {config.get(k)!r}" for k in keys]


def without_lora_layers(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with the LoRA layers peft wraps around its Linears (``load_lora_weights``) replaced by the Linears
    they wrap — a copy, where there are any — once every active adapter is fused into them (``fuse_lora``): an engine
    holds the fused weights under the Linears' own names. One line naming the first layer with an adapter unfused."""
    # peft's tuner layers, known by what they hold (peft is an optional extra, not imported for this)
    wrapped = [name for name, m in module.named_modules() if hasattr(m, "base_layer") and hasattr(m, "merged_adapters")]
    if not wrapped:
        return module
    for name in wrapped:
        layer = module.get_submodule(name)
        held = getattr(layer, "lora_A", None)  # the adapters of this layer (active_adapters are the model's)
        unfused = [a for a in layer.active_adapters if a not in layer.merged_adapters and (held is None or a in held)]
        if unfused:
            raise SlimDiffError(f"{name} holds LoRA adapter {unfused[0]!r} unfused: an engine takes fused weights, so "
                                "fuse it first (pipe.fuse_lora(...)) and hand the model over then")
    plain = copy.deepcopy(module)
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        owner = plain.get_submodule(parent)
        setattr(owner, child, getattr(owner, child).get_base_layer())
    return plain


class EngineDenoiser(torch.nn.Module):
    """What every engine-backed denoiser shares: loading, the config and properties pipelines read, device moves,
    shape checks and the locked engine run. Subclasses set :attr:`component` (the pipeline attribute they
    replace, and the engine's component name) and :attr:`families` (the model families whose engines they drive),
    and implement ``forward`` as their pipeline calls it."""

    component = ""
    families: tuple[str, ...] = ()

    def __init__(self, runner, meta: dict, folder: Path):
        from diffusers.configuration_utils import FrozenDict

        # nn.Module's own state only, not the next class's __init__: an engine that must also be a diffusers model
        # class to its pipeline (EngineControlNet, a ControlNetModel) holds no network of that class
        torch.nn.Module.__init__(self)
        family = engine_family(meta)
        if meta.get("component") != self.component or family not in self.families or "unet_config" not in meta:
            raise SlimDiffError(f"engine in {str(folder)!r} is a {family or 'unknown'} {meta.get('component')!r} "
                                f"engine, not one {type(self).__name__} drives ({', '.join(self.families)})")
        self.runner = runner
        self.meta = meta
        self.folder = Path(folder)
        # "unet_config" holds the denoiser's config, whatever its kind: stored engines and Triton repositories
        # read it under that name.
        self._config = FrozenDict(meta["unet_config"])
        self._lock = threading.Lock()
        self._profiles = [Profile.from_json(p) for p in meta["profiles"]]
        self.load_seconds = 0.0

    @classmethod
    def exported_component(cls, module, meta: dict, family=None):
        """The component engines of this class are exported from, for the PyTorch ``module`` they replace (an engine
        with optional inputs, ControlNet residuals, is compared with the denoiser taking them too) in a pipeline of
        ``family`` (default: the module's own)."""
        from ..export.modules import denoiser_component

        return denoiser_component(module, meta.get("export_options", ()), family)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | None = None, cuda_graphs: bool = True):
        """Load the denoiser engine of an engine folder (as written by ``slimdiff-export``); ``device`` defaults to
        the one it was built for. ``cuda_graphs`` applies to TensorRT engines."""
        t0 = time.perf_counter()
        meta, folder = load_engine_meta(Path(folder), cls.component)
        denoiser = cls(open_engine(meta, folder, device, cuda_graphs=cuda_graphs), meta, folder)
        denoiser.load_seconds = time.perf_counter() - t0
        return denoiser

    def load_lora_adapter(self, *args, **kwargs):
        """Refused (``pipe.load_lora_weights`` lands here): an engine holds no LoRA layers, only fused weights."""
        raise SlimDiffError(f"{type(self).__name__} runs an engine, which holds no LoRA layers: a LoRA cannot be "
                            f"loaded into it. Load and fuse the LoRA into a PyTorch copy of the {self.component} (a "
                            f"slim one made with --lora-maps) and hand that to `pipe.{self.component}."
                            "load_weights_from(module)`, or fuse it before exporting: "
                            "`slimdiff-export --lora FILE[:SCALE]`")

    def load_weights_from(self, module: torch.nn.Module) -> None:
        """Put the weights of ``module`` into the engine without exporting it again: a PyTorch denoiser of the
        architecture the engine was exported from (a slim engine's: a slim model of the same rank plan) — the same
        model with another LoRA fused, or a fine-tune of the same shapes. ONNX Runtime opens a new session with
        them, AOTInductor replaces its constants in place, TensorRT refits an engine built refittable.

        Refused in one line before the engine is touched: a backend or engine that cannot take new weights,
        another architecture (the first differing config key), the first tensor of another shape, and a change to a
        weight the engine holds no tensor of its own for (see :mod:`slimdiff.engines.weights`)."""
        state = type(self).exported_state(self.meta, self.folder, module)
        with self._lock, torch.no_grad():
            self.runner.update_weights(state)

    @classmethod
    def exported_state(cls, meta: dict, folder: Path, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The weights of ``module`` as the engine of ``meta`` in ``folder`` takes them (its exported module's state:
        heads zero-padded as the engine's were), after the checks :meth:`load_weights_from` makes."""
        from ..engines import architecture_fingerprint, get
        from ..engines.build import aligned
        from ..engines.weights import load_weights_record
        from ..export.align import planned_head_widths

        reason = get(meta["engine"]).cannot_update_weights(meta)
        if reason:
            raise SlimDiffError(reason)
        load_weights_record(meta, folder)  # an engine exported without one is refused before any work
        config = getattr(module, "config", None)
        if not isinstance(module, torch.nn.Module) or config is None:
            raise SlimDiffError(f"an engine's new weights come from a model: it takes a PyTorch {cls.component} "
                                f"(a diffusers model), not a {type(module).__name__}")
        if architecture_fingerprint(config) != meta.get("config_fingerprint"):
            differing = config_differences(meta["unet_config"], config)
            raise SlimDiffError(f"this {cls.component} is not of the architecture the engine was exported from"
                                + (f": {'; '.join(differing[:3])}" if differing else ""))
        module = without_lora_layers(module)
        recorded = meta.get("head_alignment") or {}
        if recorded:  # the engine was built from a copy with zero-padded heads: the new weights are padded alike
            planned = {path: [list(a), list(b)] for path, (a, b) in planned_head_widths(module).items()}
            if planned != recorded:
                path = next(p for p in sorted(set(planned) | set(recorded)) if planned.get(p) != recorded.get(p))
                raise SlimDiffError(f"this {cls.component}'s attention {path} has (q·k, v) head widths "
                                    f"{planned[path][0] if path in planned else 'needing no padding'}, the engine's "
                                    f"{recorded[path][0] if path in recorded else 'needed none'}: it takes a model "
                                    "of the rank plan it was exported from")
            module = aligned(module)[0]
        return cls.exported_component(module, meta).module.state_dict()

    # -- what diffusers pipelines read ------------------------------------------------------------------
    @property
    def config(self):
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def in_channels(self) -> int:
        return self._config["in_channels"]

    @property
    def out_channels(self) -> int:
        return self._config["out_channels"]

    @property
    def sample_size(self):
        return self._config["sample_size"]

    @property
    def engine(self) -> str:
        return self.meta["engine"]

    @property
    def rank_plan(self):
        """The slim model's :class:`~slimdiff.plan.RankPlan`, or ``None`` for a dense engine."""
        from ..plan import RankPlan

        body = self.meta.get("rank_plan")
        return RankPlan.from_json(json.dumps(body)) if body else None

    def to(self, *args, **kwargs):
        """Engines are built for one device and precision: moving to the same device type is a no-op (so
        ``pipe.to(...)`` works), another device type is an error, and dtype requests are ignored because
        inputs are cast on every call."""
        device, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != self.device.type:
            raise SlimDiffError(f"this {self.engine} engine runs on {self.device}; it cannot move to {device}")
        return self

    def check_shapes(self, batch: int, height: int, width: int, text_len: int,
                     reference: tuple[int, int] | None = None) -> None:
        """Raise unless (batch, latent height, latent width, tokens) — and the latent ``reference`` = (height,
        width) of a reference image, for an engine taking one (FLUX Kontext's) — fit the engine: one TensorRT
        profile, or the dynamic range of an ONNX Runtime / AOTInductor graph."""
        axes = self.meta["axes"]
        wanted = {"batch": batch, "height": height, "width": width, "text_len": text_len}
        if reference is not None:
            wanted.update(zip((REFERENCE_HEIGHT, REFERENCE_WIDTH), reference))
        if self.engine == "trt":
            ok = any(all(v in p.axis(a) for a, v in wanted.items()) for p in self._profiles)
        else:
            ok = all(axes[a]["min"] <= v <= axes[a]["max"] for a, v in wanted.items())
        multiple = axes["height"]["multiple"]
        sides = (height, width, *(reference or ()))
        if not ok or any(side % multiple for side in sides):
            boxes = "; ".join(p.describe() for p in self._profiles)
            of_reference = "" if reference is None else f", reference latent {reference[0]}x{reference[1]}"
            raise SlimDiffError(
                f"{self.component} input (batch {batch}, latent {height}x{width}{of_reference}, {text_len} tokens) is "
                f"outside this engine's shapes ({boxes}; latent sizes multiples of {multiple}); rebuild with wider "
                "--batch/--height/--width/--text-len ranges")

    def check_pooled_call(self, hidden_states, features: int, unit: str, encoder_hidden_states,
                          pooled_projections) -> None:
        """One line unless a DiT call with pooled text projections (SD3, FLUX) fits the engine: ``features`` of the
        latent (its ``unit``: channels, packed features), the pooled width, one batch for all three."""
        batch = hidden_states.shape[0]
        pooled = next(i["dims"][1] for i in self.meta["inputs"] if i["name"] == "pooled_projections")
        if (features != self.in_channels or encoder_hidden_states.shape[0] != batch
                or tuple(pooled_projections.shape) != (batch, pooled)):
            raise SlimDiffError(f"hidden_states {tuple(hidden_states.shape)} / encoder_hidden_states "
                                f"{tuple(encoder_hidden_states.shape)} / pooled_projections "
                                f"{tuple(pooled_projections.shape)} do not match this transformer "
                                f"({self.in_channels} {unit}, {pooled} pooled features, same batch)")

    def timesteps(self, timestep, batch: int) -> torch.Tensor:
        """The call's timestep(s) as the engine's (batch,) float32 input."""
        t = torch.as_tensor(timestep, device=self.device).to(torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise SlimDiffError(f"got {t.numel()} timesteps for a batch of {batch}")
        return t.contiguous()

    def run(self, inputs: list[torch.Tensor], out_shape: tuple) -> torch.Tensor:
        with self._lock:
            return self.runner.run(inputs, out_shape)

    def unet_call_inputs(self, sample, timestep, encoder_hidden_states, conditions: dict, specs: list[dict]
                         ) -> list[torch.Tensor]:
        """The engine inputs of a UNet-shaped call: the latent, the timesteps, the text, then the tensor of
        ``conditions`` named by each of ``specs`` — cast to the engine's device and precision, and checked."""
        batch = sample.shape[0]
        return [sample.to(self.device, self.dtype).contiguous(), self.timesteps(timestep, batch),
                encoder_hidden_states.to(self.device, self.dtype).contiguous(),
                *(self._condition(spec, conditions.get(spec["name"]), batch) for spec in specs)]

    def conditions(self, added_cond_kwargs: dict | None, first: int, batch: int) -> list[torch.Tensor]:
        """The engine's inputs from its ``first`` on: ``added_cond_kwargs`` entries of those names, checked."""
        added = dict(added_cond_kwargs or {})
        return [self._condition(spec, added.get(spec["name"]), batch) for spec in self.meta["inputs"][first:]]

    #: Condition inputs the denoiser's call takes as keyword arguments of their own, not ``added_cond_kwargs``
    #: entries (named so in errors).
    keyword_conditions: tuple[str, ...] = ()

    def _condition(self, spec: dict, value, batch: int) -> torch.Tensor:
        """One conditioning tensor of the call, checked against the engine's input and cast to its dtype."""
        expected = tuple(batch if d == "batch" else d for d in spec["dims"])
        name = spec["name"] if spec["name"] in self.keyword_conditions else f"added_cond_kwargs[{spec['name']!r}]"
        if value is None:
            raise SlimDiffError(f"this engine needs {name} of shape {expected} "
                                f"(call it as the pipeline it was exported from does)")
        if tuple(value.shape) != expected:
            raise SlimDiffError(f"{name} has shape {tuple(value.shape)}; this engine takes {expected}")
        return value.to(self.device, getattr(torch, spec["dtype"])).contiguous()
