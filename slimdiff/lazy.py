"""Package namespaces whose public names load on first use (PEP 562 module ``__getattr__``): ``import slimdiff``
and building a command's parser stay cheap, and torch's exporter, onnx or scikit-image load only when used."""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, exports: dict[str, str]):
    """The module ``__getattr__`` of ``package``: ``exports`` maps each public name to its defining submodule."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f".{exports[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
