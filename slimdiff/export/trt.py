"""TensorRT engines from the exported ONNX graphs.

* **Precision lives in the graph.** TensorRT 10.12 deprecated and 11.x removed the weak-typing builder flags
  (``BuilderFlag.FP16``), so an FP16 engine is built from the FP16 ONNX export as a *strongly typed* network:
  the flag is required on 10.x and accepted (ignored) on 11.x. Norms stay accurate because ONNX
  ``GroupNormalization``/``LayerNormalization`` compute their statistics in float32 (``stash_type``).
* **One optimization profile per requested shape range** (the sidecar's profiles), in the sidecar's order.
* **Timing cache reused between builds**: loaded before and saved after every build, one file per TensorRT
  version and GPU architecture.
* **Builder optimization level** (0–5) passed through.
* The engine is written atomically next to metadata recording the TensorRT version, GPU name and compute
  capability, the profiles, the source ONNX sha256 and the rank plan. :func:`load_trt_engine` refuses an
  engine whose metadata does not match the running TensorRT and GPU.
* Opset 23's native ``Attention`` needs TensorRT ≥ 10.14; older versions get the opset-18 export
  (:func:`opset_for_tensorrt`).

Everything that does not need TensorRT itself (profiles, metadata checks, opset choice) is plain Python and
is tested without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import time
from pathlib import Path

from ..errors import SlimDiffError
from .meta import status, write_bytes_atomic
from .onnx import DEFAULT_OPSET, FALLBACK_OPSET
from .shapes import Profile, tensor_profile

NO_TENSORRT = ("TensorRT is not installed here (it needs an NVIDIA GPU and `pip install slimdiff[trt]`); "
               "use --engine ort or --engine aoti instead")
#: The first TensorRT whose ONNX parser accepts the opset-23 ``Attention`` op.
ATTENTION_OP_MIN_VERSION = (10, 14)
OPT_LEVELS = range(6)
ENV_KEYS = ("tensorrt_version", "gpu_name", "compute_capability")


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def require_tensorrt():
    """The ``tensorrt`` module, or the one-line error naming the alternatives."""
    if not tensorrt_available():
        raise SlimDiffError(NO_TENSORRT)
    import tensorrt

    return tensorrt


def parse_version(text: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", str(text))
    if not numbers:
        raise SlimDiffError(f"cannot read a version number from {text!r}")
    return tuple(int(n) for n in numbers[:3])


def opset_for_tensorrt(version: str) -> int:
    """Opset 23 (fused ``Attention``) where the parser supports it, the decomposed opset-18 graph otherwise."""
    return DEFAULT_OPSET if parse_version(version)[:2] >= ATTENTION_OP_MIN_VERSION else FALLBACK_OPSET


def optimization_profiles(sidecar: dict) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """For each profile of an ONNX sidecar: input name → (min, opt, max) shape, as TensorRT takes them.
    Axes a component caps (the text encoder's 77 positions) are clipped to the graph's own range."""
    caps = {a: r["max"] for a, r in sidecar["axes"].items()}
    out = []
    for body in sidecar["profiles"]:
        profile = Profile.from_json(body)
        out.append({name: tensor_profile(dims, profile, clip=caps) for name, dims in sidecar["input_axes"].items()})
    return out


def profile_for_shapes(profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose ranges hold every input shape; -1 when none does."""
    for i, profile in enumerate(profiles):
        if all(len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi))
               for n, (lo, _, hi) in profile.items()):
            return i
    return -1


def current_environment() -> dict:
    """TensorRT version and GPU of this process (needs TensorRT and a CUDA device)."""
    trt = require_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise SlimDiffError("TensorRT engines need a CUDA GPU, and torch sees none here")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}"}


def check_environment(recorded: dict, current: dict, engine_path: Path) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU: TensorRT engines hold tactics
    compiled for one version and one device model."""
    bad = [f"{k.replace('_', ' ')} {recorded.get(k)!r} (here: {current.get(k)!r})"
           for k in ENV_KEYS if recorded.get(k) != current.get(k)]
    if bad:
        raise SlimDiffError(f"TensorRT engine {str(engine_path)!r} was built for {'; '.join(bad)}; "
                            "rebuild it on this machine with slimdiff-export --engine trt")


def default_timing_cache(env: dict) -> Path:
    """One cache file per TensorRT version and GPU architecture (timings do not transfer between them)."""
    root = Path(os.environ.get("SLIMDIFF_CACHE", Path.home() / ".cache" / "slimdiff")) / "tensorrt"
    return root / f"timing-trt{env['tensorrt_version']}-sm{env['compute_capability'].replace('.', '')}.cache"


@functools.cache
def _logger(trt):
    """One process-wide logger: TensorRT objects keep a raw pointer to it, so it must outlive them all."""
    return trt.Logger(trt.Logger.WARNING)


def build_trt_engine(onnx_path: Path, sidecar: dict, engine_path: Path, *, opt_level: int = 3,
                     timing_cache: Path | None = None, workspace_gib: float | None = None) -> dict:
    """Parse ``onnx_path`` (external data is found next to it) and build a serialized engine at
    ``engine_path``; returns the runtime part of the engine metadata."""
    trt = require_tensorrt()
    if opt_level not in OPT_LEVELS:
        raise SlimDiffError(f"builder optimization level must be 0..5, got {opt_level}")
    env = current_environment()
    if sidecar["opset"] >= DEFAULT_OPSET and parse_version(env["tensorrt_version"])[:2] < ATTENTION_OP_MIN_VERSION:
        raise SlimDiffError(f"TensorRT {env['tensorrt_version']} cannot parse opset-{sidecar['opset']} Attention; "
                            f"export with --opset {FALLBACK_OPSET}")
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SlimDiffError(f"TensorRT cannot parse {Path(onnx_path).name}: "
                            f"{errors[0].splitlines()[0] if errors else 'unknown parser error'}")

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profiles = optimization_profiles(sidecar)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    timing_cache = Path(timing_cache) if timing_cache else default_timing_cache(env)
    cache_blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    if cache is None or not config.set_timing_cache(cache, False):
        status(f"timing cache {timing_cache} does not fit this TensorRT/GPU; starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), False)

    status(f"building TensorRT engine from {Path(onnx_path).name} ({len(profiles)} profile(s), "
           f"optimization level {opt_level}); this takes minutes")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SlimDiffError(f"TensorRT failed to build an engine from {Path(onnx_path).name} (see its log above)")
    write_bytes_atomic(engine_path, serialized)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(timing_cache, config.get_timing_cache().serialize())
    seconds = time.perf_counter() - t0
    status(f"TensorRT engine {Path(engine_path).name}: {Path(engine_path).stat().st_size / 2**20:.1f} MiB "
           f"in {seconds:.0f} s")
    return {
        **env,
        "builder_optimization_level": opt_level,
        "strongly_typed": bool(flags),
        "timing_cache": str(timing_cache),
        "tensor_profiles": [{n: [list(s) for s in v] for n, v in p.items()} for p in profiles],
        "build_seconds": round(seconds, 1),
        "files": [Path(engine_path).name],
    }


def load_trt_engine(engine_path: Path, runtime_meta: dict):
    """``(runtime, engine)`` for a serialized engine whose metadata matches this TensorRT and GPU."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise SlimDiffError(f"TensorRT engine {str(engine_path)!r} is missing")
    trt = require_tensorrt()
    check_environment(runtime_meta, current_environment(), engine_path)
    runtime = trt.Runtime(_logger(trt))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise SlimDiffError(f"TensorRT could not deserialize {str(engine_path)!r}: the file is corrupt")
    return runtime, engine
