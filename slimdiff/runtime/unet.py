"""Engine-backed denoisers that drop into a diffusers pipeline: ``EngineUNet`` as ``pipe.unet`` (here),
``EnginePixArtTransformer`` (:mod:`.pixart`), ``EngineSD3Transformer`` (:mod:`.sd3`) and ``EngineFluxTransformer``
(:mod:`.flux`) as ``pipe.transformer``, on one base (:mod:`.denoiser`).

``EngineUNet`` takes the call a ``StableDiffusionPipeline`` makes (``unet(latents, t, encoder_hidden_states=...,
return_dict=False)``), returns ``UNet2DConditionOutput`` or a tuple, and exposes what pipelines read:
``config`` (the original UNet's), ``dtype``, ``device``, ``in_channels``... Inputs are cast to the engine's
precision and the output back to the caller's, so a float32 pipeline can drive an FP16 engine.

**Threads.** One engine denoiser may be called from several threads: calls are serialised by a lock, because
the engine's bound buffers (and TensorRT's execution context) are shared. For concurrent throughput, load
one per thread — each has its own session / execution context, stream and buffers.

SDXL engines take the pipeline's ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) as two more inputs, engines
of guidance-distilled (LCM) UNets its ``timestep_cond`` (the embedded guidance scale) as one more.

**ControlNet.** An engine built with ControlNet residual inputs (``slimdiff-export --controlnet-inputs``) takes the
``down_block_additional_residuals`` and ``mid_block_additional_residual`` a ControlNet pipeline passes, after the
inputs above; called without them (a plain pipeline) it gets zeros, which the UNet adds to nothing. The ControlNet
itself stays in PyTorch. An engine built without them refuses residuals in one line.

Not supported by UNet engines (a clear error, never a silent wrong result): ControlNet residuals on an engine built
without them, T2I-Adapter residuals (``down_intrablock_additional_residuals``), attention masks,
``cross_attention_kwargs`` (LoRA scale), class labels, and timestep conditioning or added conditions the engine
was not exported with (IP-Adapter image embeddings).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..engines import engine_meta_path, load_engine_meta
from ..errors import SlimDiffError
from ..export.shapes import tensor_shapes
from ..families.base import CONTROLNET_RESIDUALS
from ..families.sd import DOWN_RESIDUAL, GUIDANCE_EMBEDDING
from .controlnet import EngineControlNet, EngineFluxControlNet
from .denoiser import EngineDenoiser, config_differences, engine_family
from .flux import EngineFluxTransformer
from .pixart import EnginePixArtTransformer
from .sd3 import EngineSD3Transformer


class EngineUNet(EngineDenoiser):
    component = "unet"
    families = ("sd", "sdxl", "sd-inpaint", "sdxl-inpaint", "sdxl-refiner")
    keyword_conditions = (GUIDANCE_EMBEDDING,)

    @property
    def add_embedding(self):
        """What ``StableDiffusionXLPipeline`` reads to check its micro-conditioning: the input width of the
        added-condition embedding (``add_embedding.linear_1.in_features``); ``None`` without one."""
        width = self._config.get("projection_class_embeddings_input_dim")
        return SimpleNamespace(linear_1=SimpleNamespace(in_features=width)) if width else None

    # -- the call ---------------------------------------------------------------------------------------
    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        conditions, residuals = self._condition_specs, self._residual_specs
        added = dict(added_cond_kwargs or {})
        controlnet = {"down_block_additional_residuals": down_block_additional_residuals,
                      "mid_block_additional_residual": mid_block_additional_residual}
        passed = [k for k, v in controlnet.items() if v is not None]
        if passed and not residuals:
            raise SlimDiffError(f"this UNet engine ({self.folder}) was built without ControlNet residual inputs, so it "
                                f"cannot take {' and '.join(passed)}: rebuild it with slimdiff-export "
                                "--controlnet-inputs, or keep the PyTorch UNet")
        if len(passed) == 1:
            raise SlimDiffError(f"got {passed[0]} alone: a ControlNet passes down_block_additional_residuals and "
                                "mid_block_additional_residual together (T2I-Adapter residuals need the PyTorch UNet)")
        taken = {c["name"] for c in conditions}
        extras = {"class_labels": class_labels,
                  "timestep_cond": None if GUIDANCE_EMBEDDING in taken else timestep_cond,
                  "attention_mask": attention_mask,
                  "cross_attention_kwargs": cross_attention_kwargs or None,
                  "added_cond_kwargs": {k: v for k, v in added.items() if k not in taken} or None,
                  "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
                  "encoder_attention_mask": encoder_attention_mask}
        unsupported = [k for k, v in extras.items() if v is not None]
        if unsupported:
            raise SlimDiffError(f"engine UNets do not support {', '.join(unsupported)} (masks, LoRA scales, "
                                "T2I-Adapters and extra conditions need the PyTorch UNet)")
        given = {**added, GUIDANCE_EMBEDDING: timestep_cond}
        if sample.ndim != 4 or encoder_hidden_states.ndim != 3:
            raise SlimDiffError(f"expected sample (B,C,H,W) and encoder_hidden_states (B,T,D), got "
                                f"{tuple(sample.shape)} and {tuple(encoder_hidden_states.shape)}")
        batch, channels, height, width = sample.shape
        if channels != self.in_channels or encoder_hidden_states.shape[0] != batch:
            raise SlimDiffError(f"sample {tuple(sample.shape)} / encoder_hidden_states "
                                f"{tuple(encoder_hidden_states.shape)} do not match this UNet "
                                f"({self.in_channels} channels, same batch)")
        self.check_shapes(batch, height, width, encoder_hidden_states.shape[1])
        inputs = [*self.unet_call_inputs(sample, timestep, encoder_hidden_states, given, conditions),
                  *self._residuals(down_block_additional_residuals, mid_block_additional_residual,
                                   {"batch": batch, "height": height, "width": width})]
        out = self.run(inputs, (batch, self.out_channels, height, width))
        out = out.to(device=sample.device, dtype=sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    @property
    def takes_controlnet_residuals(self) -> bool:
        """Whether the engine was built with ControlNet residual inputs (``slimdiff-export --controlnet-inputs``)."""
        return CONTROLNET_RESIDUALS in self.meta.get("export_options", ())

    @property
    def _residual_specs(self) -> list[dict]:
        """The engine's ControlNet residual inputs (the down blocks' in order, then the mid block's): its last ones."""
        if not self.takes_controlnet_residuals:
            return []
        names = [spec["name"] for spec in self.meta["inputs"]]
        return self.meta["inputs"][names.index(DOWN_RESIDUAL.format(0)):]

    @property
    def _condition_specs(self) -> list[dict]:
        """What the engine was exported with beyond the SD call and the ControlNet residuals (SDXL's conditions)."""
        return self.meta["inputs"][3:len(self.meta["inputs"]) - len(self._residual_specs)]

    def _residuals(self, down, mid, values: dict[str, int]) -> list[torch.Tensor]:
        """The residual inputs of the call: ``down`` and ``mid`` checked against the engine's, or zeros (no
        ControlNet: adding zeros leaves the UNet's output as it is)."""
        specs = self._residual_specs
        shapes = [tensor_shapes(spec["dims"], values) for spec in specs]
        if down is None:
            return [torch.zeros(shape, device=self.device, dtype=self.dtype) for shape in shapes]
        given = [*down, mid]
        if [tuple(t.shape) for t in given] != shapes:
            raise SlimDiffError(f"ControlNet residuals of shapes {[tuple(t.shape) for t in down]} (down) and "
                                f"{tuple(mid.shape)} (mid) do not fit this UNet at a latent of {values['height']}x"
                                f"{values['width']}: it takes {shapes[:-1]} and {shapes[-1]} (a ControlNet made from "
                                "this UNet's architecture gives them)")
        return [t.to(self.device, self.dtype).contiguous() for t in given]

    def call_exported(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The pipeline's call on the exported inputs (``denoiser_component(...).random_inputs``), as
        ``slimdiff-export`` verifies an engine."""
        conditions, residuals = self._condition_specs, self._residual_specs
        added = {spec["name"]: t for spec, t in zip(conditions, inputs[3:])}
        call = {"timestep_cond": added.pop(GUIDANCE_EMBEDDING, None), "added_cond_kwargs": added or None}
        if residuals:
            *down, mid = inputs[len(inputs) - len(residuals):]
            call.update(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        return self(inputs[0], inputs[1], encoder_hidden_states=inputs[2], return_dict=False, **call)[0]


def _describe_signature(signature) -> str:
    return ", ".join(f"{i['name']} ({i['dtype']}, rank {i['rank']})" for i in signature) if signature else "none recorded"


def check_engine_belongs(pipe_denoiser, meta: dict, folder: Path, family=None) -> None:
    """Refuse an engine whose input signature or config fingerprint differs from the pipeline's denoiser (called as
    the pipeline's ``family`` calls it, where one is registered for it: FLUX Kontext's transformer takes the
    reference image too): one line naming both sides (and the first differing config keys)."""
    from ..engines import architecture_fingerprint, input_signature

    if isinstance(pipe_denoiser, EngineDenoiser):
        expected = pipe_denoiser.meta.get("signature")
        kind = pipe_denoiser.component
    else:
        component = engine_class(meta).exported_component(pipe_denoiser, meta, family)
        expected, kind = input_signature(component), component.name
    what = "UNet" if kind == "unet" else kind
    found = meta.get("signature")
    problems = []
    if found != expected:
        problems.append(f"inputs {_describe_signature(found)} (the pipeline's {what} takes "
                        f"{_describe_signature(expected)})")
    config = pipe_denoiser.config
    fingerprint = architecture_fingerprint(config)
    if meta.get("config_fingerprint") != fingerprint:
        differing = "; ".join(config_differences(meta.get("unet_config", {}), config)[:3])
        problems.append(f"{what} config fingerprint {str(meta.get('config_fingerprint'))[:12]} (the pipeline's is "
                        f"{fingerprint[:12]}{': ' + differing if differing else ''})")
    if problems:
        raise SlimDiffError(f"engine in {str(folder)!r} was not built for this pipeline's {what}: "
                            + "; ".join(problems)
                            + " — rebuild it from this model, or pass check_model=False if you know it fits")


ENGINE_CLASSES: tuple[type[EngineDenoiser], ...] = (EngineUNet, EnginePixArtTransformer, EngineSD3Transformer,
                                                    EngineFluxTransformer, EngineControlNet, EngineFluxControlNet)


def engine_class(meta: dict) -> type[EngineDenoiser]:
    """The engine-backed denoiser that drives the engine of ``meta`` (by the model family it was exported from)."""
    family = engine_family(meta)
    for cls in ENGINE_CLASSES:
        if cls.component == meta.get("component") and family in cls.families:
            return cls
    raise SlimDiffError(f"no engine runtime for a {family or 'unknown'} {meta.get('component')!r} engine")


def use_engine(pipe, folder: str | Path, device: str | None = None, cuda_graphs: bool = True,
               check_model: bool = True) -> EngineDenoiser:
    """Replace the pipeline's denoiser (``pipe.unet``, or ``pipe.transformer`` for PixArt, SD3 and FLUX: whichever the
    engine in ``folder`` was exported from) with that engine; returns it. A ControlNet engine replaces a ControlNet
    pipeline's ``pipe.controlnet``.

    The engine must have been built for this pipeline's denoiser: same input signature (names, dtypes, ranks) and
    same config fingerprint. ``check_model=False`` skips that check, for users who know the engine fits."""
    meta, folder = _denoiser_meta(folder)
    cls = engine_class(meta)
    if getattr(pipe, cls.component, None) is None:
        raise SlimDiffError(f"the engine in {str(folder)!r} replaces a pipeline's {cls.component}; "
                            f"{type(pipe).__name__} has none")
    if check_model:
        from ..families import FAMILIES, load_builtin

        load_builtin()
        family = FAMILIES.get(pipe)  # None for the pipelines no family is registered for (ControlNet pipelines)
        check_engine_belongs(getattr(pipe, cls.component), meta, folder,
                             family if family is not None and family.component == cls.component else None)
    denoiser = cls.from_folder(folder, device=device, cuda_graphs=cuda_graphs)
    setattr(pipe, cls.component, denoiser)
    return denoiser


def open_denoiser_engine(folder: str | Path, device: str | None = None, cuda_graphs: bool = True) -> EngineDenoiser:
    """The engine-backed denoiser of an engine folder, whichever denoiser (UNet, PixArt, SD3 or FLUX transformer) it was
    exported from, outside any pipeline."""
    meta, folder = _denoiser_meta(folder)
    return engine_class(meta).from_folder(folder, device=device, cuda_graphs=cuda_graphs)


def _denoiser_meta(folder: str | Path) -> tuple[dict, Path]:
    """The metadata of the denoiser engine in ``folder`` (``unet.engine.json`` or ``transformer.engine.json``)."""
    folder = Path(folder)
    found = [c for c in dict.fromkeys(cls.component for cls in ENGINE_CLASSES) if engine_meta_path(folder, c).is_file()]
    return load_engine_meta(folder, found[0] if found else EngineUNet.component)  # names what is missing
