"""Reusing an identical earlier ONNX export (opt-in: ``SLIMDIFF_EXPORT_CACHE=DIR``).

Every ``slimdiff-export`` run exports the text encoders and the VAE again, although only the denoiser differs
between a dense and a slim run, or between slim runs at several budgets (SDXL's second text encoder alone takes
minutes). With the variable set, :func:`~slimdiff.export.onnx.export_onnx` looks an export up by a digest of
everything that decides its graph — the component's inputs and outputs, its modules' classes, configs and plain
attributes (a family's export options), the values of every parameter and buffer, the axes, opset and dtype, and the
versions of slimdiff, torch and the exporters — and copies the graph and its sidecar instead of exporting when the
digest is known. Graphs with external data (over 2 GB) are not kept: their weights file is named inside the graph.
Entries are written whole (a staged folder renamed), so a run cut short or a second process never leaves half an
entry; two processes exporting the same component at once both export, and the first entry stays.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..fingerprint import canonical_json, config_fingerprint
from .meta import write_json_atomic

#: The environment variable naming the cache folder; unset or empty: no cache.
CACHE_VARIABLE = "SLIMDIFF_EXPORT_CACHE"
_GRAPH, _SIDECAR = "graph.onnx", "sidecar.json"
_ENTRY_FORMAT = "slimdiff-export-cache/1"


def cache_folder() -> Path | None:
    """The folder ``SLIMDIFF_EXPORT_CACHE`` names, or None when it is unset."""
    folder = os.environ.get(CACHE_VARIABLE, "").strip()
    return Path(folder) if folder else None


def _described(value, depth: int = 0):
    """What of a module's plain attribute decides its export: values, and for a bound method or another object
    (a family with its export options) its class and its own plain attributes, a few levels deep."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_described(v, depth) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_described(v, depth) for v in value), key=repr)
    if isinstance(value, dict):
        return {str(k): _described(v, depth) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value)
    if hasattr(value, "__self__") and hasattr(value, "__func__"):  # a bound method: what it is bound to counts
        return {"method": value.__func__.__qualname__, "of": _described(value.__self__, depth)}
    described = {"type": f"{type(value).__module__}.{type(value).__qualname__}"}
    if depth < 3 and hasattr(value, "__dict__") and not isinstance(value, nn.Module):
        described.update({k: _described(v, depth + 1) for k, v in sorted(vars(value).items())
                          if not k.startswith("__") and (not callable(v) or hasattr(v, "__self__"))})
    return described


def _tensor_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _modules_description(module: nn.Module) -> list:
    """Each submodule's class, config (a diffusers or transformers model's) and plain attributes, in order."""
    out = []
    for name, sub in module.named_modules():
        config = getattr(sub, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else config  # transformers' config object
        plain = {k: _described(v) for k, v in sorted(vars(sub).items())
                 if not k.startswith("_") and k not in ("training", "config") and not isinstance(v, nn.Module)}
        call = getattr(sub, "_call", None)  # the denoiser wrapper's call: its family's export_call
        out.append([name, f"{type(sub).__module__}.{type(sub).__qualname__}",
                    config_fingerprint(config) if hasattr(config, "items") else None, plain,
                    _described(call) if call is not None else None])
    return out


def export_key(component, axes: dict, opset: int, dtype: torch.dtype, parity_device: str) -> str:
    """The digest of everything that decides ``component``'s export at these settings."""
    import onnx
    import onnxscript
    import onnxslim

    digest = hashlib.sha256(canonical_json({
        "format": _ENTRY_FORMAT,
        "versions": [__version__, torch.__version__, onnx.__version__, onnxscript.__version__, onnxslim.__version__],
        "name": component.name, "outputs": list(component.outputs),
        "inputs": [repr(spec) for spec in component.inputs], "clip": component.clip,
        "limits": {k: list(v) for k, v in component.limits.items()}, "attention": component.attention_modules,
        "modules": _modules_description(component.module),
        "axes": axes, "opset": opset, "dtype": str(dtype), "parity_device": parity_device,
    }).encode())
    for name, tensor in [*component.module.named_parameters(), *component.module.named_buffers()]:
        digest.update(name.encode())
        digest.update(_tensor_digest(tensor).encode())
    return digest.hexdigest()


def reuse(folder: Path, key: str, out_path: Path) -> dict | None:
    """Copy the entry ``key`` to ``out_path``; its stored sidecar, or None when there is no such entry."""
    entry = folder / key
    try:
        sidecar = json.loads((entry / _SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no entry, or one damaged since: export again
        return None
    shutil.copyfile(entry / _GRAPH, out_path)
    return sidecar


def keep(folder: Path, key: str, out_path: Path, sidecar: dict) -> None:
    """Store the export ``out_path`` (a graph without external data) and its ``sidecar`` as the entry ``key``."""
    entry = folder / key
    if entry.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f".{key}.partial-{os.getpid()}"
    staged.mkdir()
    try:
        shutil.copyfile(out_path, staged / _GRAPH)
        write_json_atomic(staged / _SIDECAR, sidecar)
        os.rename(staged, entry)
    except OSError:  # another process stored it first (or the disk is full): the export itself is done
        shutil.rmtree(staged, ignore_errors=True)
