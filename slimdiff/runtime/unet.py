"""``EngineUNet``: an engine-backed UNet that drops into a diffusers pipeline as ``pipe.unet``.

It takes the call a ``StableDiffusionPipeline`` makes (``unet(latents, t, encoder_hidden_states=...,
return_dict=False)``), returns ``UNet2DConditionOutput`` or a tuple, and exposes what pipelines read:
``config`` (the original UNet's), ``dtype``, ``device``, ``in_channels``... Inputs are cast to the engine's
precision and the output back to the caller's, so a float32 pipeline can drive an FP16 engine.

**Threads.** One ``EngineUNet`` may be called from several threads: calls are serialised by a lock, because
the engine's bound buffers (and TensorRT's execution context) are shared. For concurrent throughput, load
one ``EngineUNet`` per thread — each has its own session / execution context, stream and buffers.

SDXL engines take the pipeline's ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) as two more inputs.

Not supported by engines (a clear error, never a silent wrong result): ControlNet residuals, attention
masks, ``cross_attention_kwargs`` (LoRA scale), class labels, timestep conditioning and added conditions the
engine was not exported with (IP-Adapter image embeddings).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..engines import load_engine_meta, open_engine
from ..errors import SlimDiffError
from ..export.shapes import Profile


class EngineUNet(torch.nn.Module):
    def __init__(self, runner, meta: dict, folder: Path):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        if meta.get("component") != "unet" or "unet_config" not in meta:
            raise SlimDiffError(f"engine in {str(folder)!r} is a {meta.get('component')!r} engine, not a UNet")
        self.runner = runner
        self.meta = meta
        self.folder = Path(folder)
        self._config = FrozenDict(meta["unet_config"])
        self._lock = threading.Lock()
        self._profiles = [Profile.from_json(p) for p in meta["profiles"]]
        self.load_seconds = 0.0

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | None = None, cuda_graphs: bool = True) -> EngineUNet:
        """Load the UNet engine of an engine folder (as written by ``slimdiff-export``); ``device`` defaults to
        the one it was built for. ``cuda_graphs`` applies to TensorRT engines."""
        t0 = time.perf_counter()
        meta, folder = load_engine_meta(Path(folder), "unet")
        unet = cls(open_engine(meta, folder, device, cuda_graphs=cuda_graphs), meta, folder)
        unet.load_seconds = time.perf_counter() - t0
        return unet

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
    def add_embedding(self):
        """What ``StableDiffusionXLPipeline`` reads to check its micro-conditioning: the input width of the
        added-condition embedding (``add_embedding.linear_1.in_features``); ``None`` without one."""
        width = self._config.get("projection_class_embeddings_input_dim")
        return SimpleNamespace(linear_1=SimpleNamespace(in_features=width)) if width else None

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

    # -- the call ---------------------------------------------------------------------------------------
    def check_shapes(self, batch: int, height: int, width: int, text_len: int) -> None:
        """Raise unless (batch, latent height, latent width, tokens) fit the engine: one TensorRT profile, or
        the dynamic range of an ONNX Runtime / AOTInductor graph."""
        axes = self.meta["axes"]
        wanted = {"batch": batch, "height": height, "width": width, "text_len": text_len}
        if self.engine == "trt":
            ok = any(all(v in p.axis(a) for a, v in wanted.items()) for p in self._profiles)
        else:
            ok = all(axes[a]["min"] <= v <= axes[a]["max"] for a, v in wanted.items())
        multiple = axes["height"]["multiple"]
        if not ok or height % multiple or width % multiple:
            boxes = "; ".join(p.describe() for p in self._profiles)
            raise SlimDiffError(
                f"UNet input (batch {batch}, latent {height}x{width}, {text_len} tokens) is outside this engine's "
                f"shapes ({boxes}; latent sizes multiples of {multiple}); rebuild with wider --batch/--height/"
                "--width/--text-len ranges")

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        conditions = self.meta["inputs"][3:]  # what the engine was exported with beyond the SD call
        added = dict(added_cond_kwargs or {})
        extras = {"class_labels": class_labels, "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                  "cross_attention_kwargs": cross_attention_kwargs or None,
                  "added_cond_kwargs": {k: v for k, v in added.items() if k not in {c["name"] for c in conditions}}
                  or None,
                  "down_block_additional_residuals": down_block_additional_residuals,
                  "mid_block_additional_residual": mid_block_additional_residual,
                  "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
                  "encoder_attention_mask": encoder_attention_mask}
        unsupported = [k for k, v in extras.items() if v is not None]
        if unsupported:
            raise SlimDiffError(f"engine UNets do not support {', '.join(unsupported)} (ControlNet, masks, LoRA "
                                "scales and extra conditions need the PyTorch UNet)")
        if sample.ndim != 4 or encoder_hidden_states.ndim != 3:
            raise SlimDiffError(f"expected sample (B,C,H,W) and encoder_hidden_states (B,T,D), got "
                                f"{tuple(sample.shape)} and {tuple(encoder_hidden_states.shape)}")
        batch, channels, height, width = sample.shape
        if channels != self.in_channels or encoder_hidden_states.shape[0] != batch:
            raise SlimDiffError(f"sample {tuple(sample.shape)} / encoder_hidden_states "
                                f"{tuple(encoder_hidden_states.shape)} do not match this UNet "
                                f"({self.in_channels} channels, same batch)")
        self.check_shapes(batch, height, width, encoder_hidden_states.shape[1])
        t = torch.as_tensor(timestep, device=self.device).to(torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise SlimDiffError(f"got {t.numel()} timesteps for a batch of {batch}")
        inputs = [sample.to(self.device, self.dtype).contiguous(), t.contiguous(),
                  encoder_hidden_states.to(self.device, self.dtype).contiguous()]
        for spec in conditions:
            inputs.append(self._condition(spec, added.get(spec["name"]), batch))
        out_shape = (batch, self._config["out_channels"], height, width)
        with self._lock:
            out = self.runner.run(inputs, out_shape)
        out = out.to(device=sample.device, dtype=sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


    def _condition(self, spec: dict, value, batch: int) -> torch.Tensor:
        """One ``added_cond_kwargs`` tensor, checked against the engine's input and cast to its dtype."""
        expected = tuple(batch if d == "batch" else d for d in spec["dims"])
        if value is None:
            raise SlimDiffError(f"this engine needs added_cond_kwargs[{spec['name']!r}] of shape {expected} "
                                "(an SDXL UNet: call it as StableDiffusionXLPipeline does)")
        if tuple(value.shape) != expected:
            raise SlimDiffError(f"added_cond_kwargs[{spec['name']!r}] has shape {tuple(value.shape)}; this engine "
                                f"takes {expected}")
        return value.to(self.device, getattr(torch, spec["dtype"])).contiguous()


def _describe_signature(signature) -> str:
    return ", ".join(f"{i['name']} ({i['dtype']}, rank {i['rank']})" for i in signature) if signature else "none recorded"


def check_engine_belongs(pipe_unet, meta: dict, folder: Path) -> None:
    """Refuse an engine whose input signature or UNet config fingerprint differs from the pipeline's UNet:
    one line naming both sides (and the first differing config keys)."""
    from ..engines import architecture_fingerprint, input_signature
    from ..engines.base import SLIM_CONFIG_KEYS
    from ..export.modules import unet_component

    if isinstance(pipe_unet, EngineUNet):
        expected = pipe_unet.meta.get("signature")
    else:
        expected = input_signature(unet_component(pipe_unet))
    found = meta.get("signature")
    problems = []
    if found != expected:
        problems.append(f"inputs {_describe_signature(found)} (the pipeline's UNet takes "
                        f"{_describe_signature(expected)})")
    fingerprint = architecture_fingerprint(pipe_unet.config)
    if meta.get("config_fingerprint") != fingerprint:
        engine_cfg = meta.get("unet_config", {})
        keys = [k for k in sorted(set(engine_cfg) | set(pipe_unet.config))
                if not k.startswith("_") and k not in SLIM_CONFIG_KEYS
                and json.dumps(engine_cfg.get(k), default=str) != json.dumps(pipe_unet.config.get(k), default=str)]
        differing = "; ".join(f"{k} {engine_cfg.get(k)!r} vs {pipe_unet.config.get(k)!r}" for k in keys[:3])
        problems.append(f"UNet config fingerprint {str(meta.get('config_fingerprint'))[:12]} (the pipeline's is "
                        f"{fingerprint[:12]}{': ' + differing if differing else ''})")
    if problems:
        raise SlimDiffError(f"engine in {str(folder)!r} was not built for this pipeline's UNet: " + "; ".join(problems)
                            + " — rebuild it from this model, or pass check_model=False if you know it fits")


def use_engine(pipe, folder: str | Path, device: str | None = None, cuda_graphs: bool = True,
               check_model: bool = True) -> EngineUNet:
    """Replace ``pipe.unet`` with the UNet engine in ``folder``; returns it.

    The engine must have been built for this pipeline's UNet: same input signature (names, dtypes, ranks) and
    same config fingerprint. ``check_model=False`` skips that check, for users who know the engine fits."""
    meta, folder = load_engine_meta(Path(folder), "unet")
    if check_model:
        check_engine_belongs(pipe.unet, meta, folder)
    unet = EngineUNet.from_folder(folder, device=device, cuda_graphs=cuda_graphs)
    pipe.unet = unet
    return unet
