"""Reusing an identical earlier ONNX export (opt-in: ``SLIMDIFF_EXPORT_CACHE=DIR``).

Every ``slimdiff-export`` run exports the text encoders and the VAE again, although only the denoiser differs between
a dense and a slim run, or between slim runs at several budgets. With the variable set,
:func:`~slimdiff.export.onnx.export_onnx` looks an export up by a digest of everything that decides its graph — the
component's inputs and outputs, its modules' classes, configs and plain attributes (a family's export options, an
attention processor's widths), the values of every parameter and buffer, the axes, opset and dtype, the versions of
torch, diffusers, transformers and the exporters, and slimdiff's own source — and copies the graph and its sidecar
instead of exporting when the digest is known. It fails closed: a module with hooks, or an attribute it cannot
describe by value (a function, an object without attributes of its own), makes the export uncacheable, and it runs as
without the cache. Graphs with external data (over 2 GB) are not kept: their weights file is named inside the graph.
Entries are written whole (a staged folder renamed) and checked against their recorded digest when read, so a run cut
short, a damaged entry or a second process never gives a wrong graph: at worst the export runs again.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from enum import Enum
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..fingerprint import canonical_json, config_fingerprint
from .meta import sha256_files

#: The environment variable naming the cache folder; unset or empty: no cache.
CACHE_VARIABLE = "SLIMDIFF_EXPORT_CACHE"
_GRAPH, _SIDECAR = "graph.onnx", "sidecar.json"
_ENTRY_FORMAT = "slimdiff-export-cache/2"
#: How deep an attribute's own attributes are described; deeper: uncacheable.
_DEPTH = 4
#: Attributes that say where a model was loaded from, not what it computes (transformers' ``name_or_path``): the
#: same text encoder read from two folders exports the same graph.
_PROVENANCE = frozenset({"name_or_path"})
#: The packages whose code or version decides an exported graph or its recorded parity.
_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxslim", "onnxruntime")


class Uncacheable(Exception):
    """Something of a component the key cannot describe by value: it is exported without the cache."""


def cache_folder() -> Path | None:
    """The folder ``SLIMDIFF_EXPORT_CACHE`` names (absolute: commands started elsewhere find it too), or None."""
    folder = os.environ.get(CACHE_VARIABLE, "").strip()
    return Path(folder).expanduser().resolve() if folder else None


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """slimdiff's own source (what wraps and calls the modules it exports) and the versions of :data:`_PACKAGES`;
    once per process."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    for name in _PACKAGES:
        try:
            digest.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=-".encode())
    return digest.hexdigest()


def _described(value, depth: int = 0):
    """A module attribute by value: plain values and containers of them, tensors and arrays by digest, a bound
    method by its function and what it is bound to, a compiled library function by its name, another object by its
    class and its own attributes (a family with its export options); :class:`Uncacheable` for what has no value to
    describe (a Python function, a closure, an object without attributes) or lies deeper than :data:`_DEPTH`."""
    if depth > _DEPTH:
        raise Uncacheable("attributes nested too deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device, Path, Enum)):
        return f"{type(value).__qualname__}:{value}"
    if isinstance(value, (tuple, list)):
        return [_described(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_described(v, depth + 1) for v in value), key=repr)
    if isinstance(value, dict):
        return {str(k): _described(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _tensor_digest(torch.as_tensor(value))
    if inspect.ismethod(value):  # what it is bound to decides what it does
        return {"method": value.__func__.__qualname__, "of": _described(value.__self__, depth + 1)}
    if inspect.isbuiltin(value) and (value.__self__ is None or inspect.ismodule(value.__self__)):
        # a compiled library function (a CLIP's `F.gelu`): its name says what it does at the versions in the key
        return {"builtin": f"{getattr(value, '__module__', None) or value.__self__.__name__}.{value.__qualname__}"}
    if inspect.isfunction(value) or isinstance(value, (functools.partial, type, nn.Module)) or \
            not hasattr(value, "__dict__"):
        raise Uncacheable(f"a {type(value).__name__} attribute")
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}",
            **{k: _described(v, depth + 1) for k, v in sorted(vars(value).items()) if not k.startswith("__")}}


def _tensor_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _has_hooks(module: nn.Module) -> bool:
    # diffusers gives a model an empty hook registry when a pipeline opens its cache context (FLUX's, SD3's):
    # that one holds no hook
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and getattr(registry, "hooks", True):
        return True
    return any(getattr(module, name, None)
               for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _modules_description(module: nn.Module) -> list:
    """Each submodule's class, config (a diffusers or transformers model's, with transformers' attention
    implementation) and plain attributes, in order; :class:`Uncacheable` for a module with hooks."""
    out = []
    for name, sub in module.named_modules():
        if _has_hooks(sub):
            raise Uncacheable(f"hooks on {name or type(sub).__name__}")
        config = getattr(sub, "config", None)
        attention = getattr(config, "_attn_implementation", None)  # eager or SDPA: fused Attention ops or not
        config = config.to_dict() if hasattr(config, "to_dict") else config  # transformers' config object
        plain = {k: _described(v) for k, v in sorted(vars(sub).items())
                 if not k.startswith("_") and k not in ("training", "config", *_PROVENANCE)
                 and not isinstance(v, nn.Module)}
        call = getattr(sub, "_call", None)  # a wrapper's call: the family's or the ControlNet kind's export_call
        out.append([name, f"{type(sub).__module__}.{type(sub).__qualname__}",
                    config_fingerprint(config) if hasattr(config, "items") else None, attention, plain,
                    _described(call) if call is not None else None])
    return out


def export_key(component, axes: dict, opset: int, dtype: torch.dtype, parity_device: str) -> str | None:
    """The digest of everything that decides ``component``'s export at these settings; None when something of it
    cannot be described by value (:class:`Uncacheable`)."""
    try:
        modules = _modules_description(component.module)
    except Uncacheable:
        return None
    digest = hashlib.sha256(canonical_json({
        "format": _ENTRY_FORMAT, "code": _code_digest(),
        "name": component.name, "outputs": list(component.outputs),
        "inputs": [repr(spec) for spec in component.inputs], "clip": component.clip,
        "limits": {k: list(v) for k, v in component.limits.items()}, "attention": component.attention_modules,
        "modules": modules, "axes": axes, "opset": opset, "dtype": str(dtype), "parity_device": parity_device,
    }).encode())
    for name, tensor in [*component.module.named_parameters(), *component.module.named_buffers()]:
        digest.update(name.encode())
        digest.update(_tensor_digest(tensor).encode())
    return digest.hexdigest()


def reuse(folder: Path, key: str, out_path: Path) -> dict | None:
    """Copy the entry ``key`` to ``out_path``; its stored sidecar, or None when there is no such entry or it is
    damaged (the export then runs again and overwrites whatever was copied)."""
    entry = folder / key
    try:
        sidecar = json.loads((entry / _SIDECAR).read_text(encoding="utf-8"))
        shutil.copyfile(entry / _GRAPH, out_path)
    except (OSError, ValueError):
        return None
    if not isinstance(sidecar, dict) or sidecar.get("sha256") != sha256_files([out_path]):
        shutil.rmtree(entry, ignore_errors=True)  # damaged: this export stores it anew
        return None
    return sidecar


def keep(folder: Path, key: str, out_path: Path, sidecar: dict) -> None:
    """Store the export ``out_path`` (a graph without external data) and its ``sidecar`` as the entry ``key``; a
    cache that cannot take it (read-only, full, another process first) leaves the export as it is."""
    try:
        if (folder / key).exists():
            return
        folder.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=folder, prefix=f".{key}."))
    except OSError:
        return
    try:
        shutil.copyfile(out_path, staged / _GRAPH)
        (staged / _SIDECAR).write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
        os.rename(staged, folder / key)
    except OSError:
        shutil.rmtree(staged, ignore_errors=True)
