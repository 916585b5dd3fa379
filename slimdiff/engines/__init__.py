"""Engine backends behind one interface and one registry (see :mod:`.base`).

* :mod:`.ort` — ONNX Runtime (CPU / CUDA), optimized graph saved next to the engine.
* :mod:`.trt` — TensorRT FP16 engines built through Polygraphy's loaders: one optimization profile per shape
  range, reused timing cache, metadata checked against the running TensorRT and GPU.
* :mod:`.aoti` — AOTInductor packages, loadable without the Python model code.
* :mod:`.build` — the UNet build path shared by ``slimdiff-export`` and the benchmark.
* :mod:`.triton` — a Triton Inference Server model repository from built engines.

Engines are served in-process by :mod:`slimdiff.runtime`.
"""

from . import aoti, ort, trt  # noqa: F401  (the built-in backends register themselves on import)
from .base import (
    ENGINE_FORMAT,
    Backend,
    Runner,
    TritonModel,
    architecture_fingerprint,
    build_engine,
    config_fingerprint,
    engine_meta_path,
    engine_outputs,
    get,
    input_signature,
    load_engine_meta,
    names,
    open_engine,
    register,
)

__all__ = [
    "ENGINE_FORMAT", "Backend", "Runner", "TritonModel", "architecture_fingerprint", "build_engine", "config_fingerprint", "engine_meta_path",
    "engine_outputs",
    "engine_outputs", "get", "input_signature", "load_engine_meta", "names", "open_engine", "register",
]
