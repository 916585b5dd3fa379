"""Building engines from models: the one path ``slimdiff-export``, the benchmark and the Triton repository share.

From a denoiser (a UNet, a PixArt or SD3 transformer, dense or slim) to an engine folder: a float32 source (fp16 is cast
per export), head widths zero-padded where the backend's kernels want it, the ONNX export with its parity check for
backends built from ONNX, then the backend's build and the metadata (variant, denoiser config, rank plan).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..export.align import align_head_widths, planned_head_widths
from ..export.modules import Component, component_axes, denoiser_component
from ..export.onnx import export_onnx
from ..export.ort_session import has_cuda
from ..export.shapes import Profile, union
from ..families import family_for
from .base import build_engine, get


def aligned(unet) -> tuple[torch.nn.Module, dict]:
    """``unet`` with aligned head widths (a padded copy only when something needs padding) and what changed."""
    if not planned_head_widths(unet):
        return unet, {}
    padded = copy.deepcopy(unet)  # the caller's UNet stays as it is (it may be slimmed next)
    return padded, align_head_widths(padded)


def build_component_engine(component: Component, kind: str, folder: Path, *, profiles: list[Profile],
                           dtype: torch.dtype, device: str, multiple: int, opset: int | None = None,
                           extra: dict | None = None, options: dict | None = None) -> tuple[dict, dict | None]:
    """Build the ``kind`` engine of ``component`` into the existing folder ``folder``: through its ONNX export
    (and parity check) for backends built from ONNX. Returns the engine metadata and the ONNX sidecar (None
    for backends that compile the module directly). ``opset`` defaults to the backend's choice."""
    backend = get(kind)
    backend.require(device)
    folder = Path(folder)
    multiples = {"height": multiple, "width": multiple}
    onnx_path = sidecar = None
    if backend.from_onnx:
        onnx_path = folder / f"{component.name}.onnx"
        parity_device = device if str(device).startswith("cuda") and has_cuda() else "cpu"
        sidecar = export_onnx(component, profiles, onnx_path, opset=opset or backend.onnx_opset(), dtype=dtype,
                              multiples=multiples, parity_device=parity_device,
                              extra={"variant": extra["variant"]} if extra and "variant" in extra else None)
        axes = sidecar["axes"]
    else:
        axes = component_axes(component, union(profiles), multiples)
    meta = build_engine(kind, component, folder, axes=axes, profiles=[p.to_json() for p in profiles], dtype=dtype,
                        device=device, onnx_path=onnx_path, extra=extra, options=options)
    return meta, sidecar


def _float32(module):
    """``module`` itself when float32, else a float32 copy: engines are exported from float32 (fp16 is cast per
    export), and the caller's module keeps its precision."""
    return module if next(module.parameters()).dtype == torch.float32 else copy.deepcopy(module).float()


def build_denoiser_engine(denoiser, kind: str, folder: Path, *, profiles: list[Profile], dtype: torch.dtype,
                          device: str, multiple: int, opset: int | None = None, variant: str | None = None, plan=None,
                          options: dict | None = None, export_options: tuple[str, ...] = (),
                          family=None) -> tuple[dict, dict | None]:
    """Build the ``kind`` engine of ``denoiser`` (on ``device``) into the existing folder ``folder``, as
    :func:`build_component_engine` does; ``variant`` defaults to slim/dense by ``plan``. ``export_options``: the
    family's optional input groups the engine takes too (ControlNet residuals), recorded in its metadata.
    ``family``: the family of the pipeline the denoiser serves, where the denoiser cannot say (FLUX Kontext's);
    default ``family_for(denoiser)``; recorded in the metadata."""
    family = family or family_for(denoiser)
    backend = get(kind)
    backend.require(device)
    source = _float32(denoiser)
    target, changed = aligned(source) if backend.needs_aligned_heads(device) else (source, {})
    # "unet_config" holds the denoiser's config whatever its kind: the name stored engines and Triton repositories
    # were written with
    extra = {"variant": variant or ("slim" if plan is not None else "dense"), "family": family.name,
             "unet_config": dict(denoiser.config),
             "parameters": sum(p.numel() for p in denoiser.parameters()),
             "rank_plan": json.loads(plan.to_json()) if plan is not None else None,
             "head_alignment": {k: [list(a), list(b)] for k, (a, b) in changed.items()},
             "export_options": sorted(export_options)}
    return build_component_engine(denoiser_component(target, export_options, family), kind, folder, profiles=profiles,
                                  dtype=dtype, device=device, multiple=multiple, opset=opset, extra=extra,
                                  options=options)


def build_controlnet_engine(controlnet, kind: str, folder: Path, *, profiles: list[Profile], dtype: torch.dtype,
                            device: str, multiple: int, opset: int | None = None,
                            options: dict | None = None) -> tuple[dict, dict | None]:
    """Build the ``kind`` engine of a ControlNet (:func:`~slimdiff.export.modules.controlnet_component`) into the
    existing folder ``folder``, as :func:`build_component_engine` does; ``slimdiff.runtime.use_engine`` puts it into
    a ControlNet pipeline as ``pipe.controlnet``."""
    from ..export.modules import controlnet_component

    get(kind).require(device)
    source = _float32(controlnet)
    extra = {"variant": "dense", "family": family_for(controlnet).name, "unet_config": dict(controlnet.config),
             "parameters": sum(p.numel() for p in controlnet.parameters())}
    return build_component_engine(controlnet_component(source), kind, folder, profiles=profiles, dtype=dtype,
                                  device=device, multiple=multiple, opset=opset, extra=extra, options=options)
