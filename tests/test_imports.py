"""Every module of the package imports with the declared dependencies alone.

A module-level import of a package that no declared dependency installs breaks every command for a new user
while the tests that happen not to touch that module stay green; walking the whole package catches it. Modules
that serve an optional extra import it lazily and must fail with one line naming the extra instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import subprocess
import sys

import pytest

import slimdiff
from slimdiff.errors import SlimDiffError

# `python -m` entry points run their command when imported; the modules they call are walked anyway.
MODULES = sorted(m.name for m in pkgutil.walk_packages(slimdiff.__path__, prefix="slimdiff.")
                 if not m.name.endswith(".__main__"))

# extra → (the package it installs, "module:function" that needs it, words the one-line error must contain)
LAZY_EXTRAS = {
    "trt": ("tensorrt", "slimdiff.engines.trt:require_tensorrt", "slimdiff[trt]"),
    "serve": ("tritonclient", "slimdiff.engines.triton:_pb", "slimdiff[serve]"),
}


def test_the_walk_finds_the_whole_package():
    assert {"slimdiff.cli", "slimdiff.calibrate", "slimdiff.cli.export", "slimdiff.quality.metrics"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("extra", sorted(LAZY_EXTRAS))
def test_optional_extra_fails_with_one_line(extra):
    package, target, words = LAZY_EXTRAS[extra]
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin is not None:  # a folder of type stubs alone is a namespace: no origin
        pytest.skip(f"{package} is installed here")
    module, func = target.split(":")
    with pytest.raises(SlimDiffError) as err:
        getattr(importlib.import_module(module), func)()
    message = str(err.value)
    assert "\n" not in message and words in message


def test_building_the_parsers_imports_no_heavy_module():
    # The parser of every command is built for `slimdiff --help`; the quality metrics and export stacks load
    # only when their command runs.
    code = ("import sys; from slimdiff.cli import build_parser; build_parser(); "
            "from slimdiff.cli.export import build_parser as b; b(); "
            "heavy = [m for m in ('skimage', 'onnxruntime', 'onnx', 'diffusers', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_tensorrt_type_stubs_are_not_tensorrt(tmp_path, monkeypatch):
    """``tensorrt-stubs`` (mypy's view of TensorRT) installs a ``tensorrt`` folder of stubs: not TensorRT."""
    from slimdiff.engines.trt import require_tensorrt, tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("class Builder: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert importlib.util.find_spec("tensorrt") is not None and not tensorrt_available()
    with pytest.raises(SlimDiffError, match="TensorRT is not installed here"):
        require_tensorrt()
