"""One entry point over the three engine kinds, and the engine metadata file they share.

An engine folder holds ``<component>.engine.json`` (format :data:`ENGINE_FORMAT`) beside the engine file(s):
the engine kind, files, precision, the shape axes and profiles it accepts, its inputs, the UNet config a
pipeline needs (``pipe.unet.config``), the rank plan for slim models, the source ONNX hash and the
kind-specific runtime facts (TensorRT version and GPU, ONNX Runtime provider, torch version).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SlimDiffError
from .meta import files_size, read_json, write_json_atomic
from .modules import Component
from .onnx import load_sidecar

ENGINE_FORMAT = "slimdiff-engine/1"
ENGINE_KINDS = ("trt", "ort", "aoti")
ENGINE_FILE = {"trt": "{name}.plan", "ort": "{name}.ort.onnx", "aoti": "{name}.pt2"}


def engine_meta_path(folder: Path, component: str = "unet") -> Path:
    return Path(folder) / f"{component}.engine.json"


def build_engine(kind: str, component: Component, folder: Path, *, axes: dict, profiles: list[dict],
                 dtype: torch.dtype, device: str, onnx_path: Path | None = None, extra: dict | None = None,
                 trt_options: dict | None = None) -> dict:
    """Build one engine into ``folder`` and write its metadata; returns the metadata.

    ``trt`` and ``ort`` start from an exported ONNX graph (``onnx_path``, checked against its sidecar first);
    ``aoti`` compiles ``component`` directly with torch.export. ``extra`` (variant, rank plan, UNet config) goes into the
    metadata as is.
    """
    if kind not in ENGINE_KINDS:
        raise SlimDiffError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
    folder = Path(folder)
    target = folder / ENGINE_FILE[kind].format(name=component.name)
    source = sidecar = None
    if kind in ("trt", "ort"):
        if onnx_path is None:
            raise SlimDiffError(f"a {kind} engine is built from an ONNX export")
        sidecar = load_sidecar(onnx_path)
        source = {"file": str(Path(onnx_path).name), "sha256": sidecar["sha256"], "opset": sidecar["opset"]}
    if kind == "trt":
        from .trt import build_trt_engine

        runtime = build_trt_engine(onnx_path, sidecar, target, **(trt_options or {}))
    elif kind == "ort":
        from .ort import build_ort_engine

        runtime = build_ort_engine(onnx_path, target, device=device)
    else:
        from .aoti import build_aoti_engine

        runtime = build_aoti_engine(component, axes, target, device=device, dtype=dtype)
    files = runtime.pop("files")
    meta = {
        "format": ENGINE_FORMAT,
        "engine": kind,
        "component": component.name,
        "file": files[0],
        "files": files,
        "size_bytes": files_size([folder / f for f in files]),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "inputs": [{"name": s.name, "dims": list(s.dims),
                    "dtype": s.dtype if s.dtype != "model" else str(dtype).removeprefix("torch.")}
                   for s in component.inputs],
        "output": component.output,
        "axes": axes,
        "profiles": profiles,
        "source_onnx": source,
        "runtime": runtime,
        **(extra or {}),
    }
    meta = json.loads(json.dumps(meta))  # what readers of the file get (tuples become lists)
    write_json_atomic(engine_meta_path(folder, component.name), meta)
    return meta


def load_engine_meta(path: Path, component: str = "unet") -> tuple[dict, Path]:
    """``(metadata, folder)`` from an engine folder or its ``.engine.json``; every listed file must exist."""
    path = Path(path)
    meta_file = path if path.suffix == ".json" else engine_meta_path(path, component)
    if meta_file is not path and not meta_file.is_file():
        raise SlimDiffError(f"{str(path)!r} is not an engine folder (no {meta_file.name}); "
                            "build one with slimdiff-export")
    meta = read_json(meta_file, "engine metadata", ENGINE_FORMAT)
    folder = meta_file.parent
    if meta.get("engine") not in ENGINE_KINDS:
        raise SlimDiffError(f"engine metadata {str(meta_file)!r} names unknown engine {meta.get('engine')!r}")
    missing = [f for f in meta.get("files", []) if not (folder / f).is_file()]
    if missing or not meta.get("files"):
        raise SlimDiffError(f"engine in {str(folder)!r} is incomplete: {', '.join(missing) or 'no files listed'} missing")
    return meta, folder
