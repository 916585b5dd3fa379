"""Stable fingerprints of models: the same weights and architecture give the same digest in every process.

Statistics, slim folders and engines record which model they belong to. A diffusers config carries
bookkeeping next to the architecture: ``_use_default_values`` (built from a set, so its order changes with
``PYTHONHASHSEED``), ``_name_or_path``, ``_diffusers_version``, ``_class_name``. Every key that starts with an
underscore is bookkeeping and left out. What remains is the resolved config — keys an older ``config.json``
lacks are filled with diffusers' defaults when the model is built, so a sparse file and a complete one that
describe the same model give the same digest. Tuples and lists hash alike (a built model has tuples, a config
read from JSON has lists).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch


def architecture_config(config: Mapping) -> dict:
    """The part of a diffusers/transformers config that describes the architecture (bookkeeping removed)."""
    return {str(k): v for k, v in dict(config).items() if not str(k).startswith("_")}


def canonical_json(value) -> str:
    """``value`` as JSON with sorted keys and no spaces (sets sorted, dtypes and other objects as text): one text
    per value in every process."""
    def fallback(obj):
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=repr)
        if isinstance(obj, torch.dtype):
            return str(obj).removeprefix("torch.")
        return str(obj)

    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=fallback)


def config_fingerprint(config: Mapping) -> str:
    """sha256 of the architecture part of ``config`` (see :func:`architecture_config`)."""
    return hashlib.sha256(canonical_json(architecture_config(config)).encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module, parameters: Iterable[str] | None = None) -> str:
    """sha256 of ``model.config`` (architecture part) and of the named parameters' values (all by default).

    Values are hashed as float32, so the digest depends on the weights and not on the device they sit on;
    names are hashed in sorted order, so it does not depend on the order they are given in either.
    """
    digest = hashlib.sha256(config_fingerprint(getattr(model, "config", {})).encode())
    params = dict(model.named_parameters())
    names = sorted(params if parameters is None else parameters)
    for name in names:
        digest.update(name.encode())
        digest.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
