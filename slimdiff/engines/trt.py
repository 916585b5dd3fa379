"""TensorRT backend: engines from the exported ONNX graphs, built through Polygraphy's loaders.

The build is Polygraphy's loader chain ``NetworkFromOnnxPath`` → ``CreateConfig(profiles=...,
load_timing_cache=...)`` → ``EngineFromNetwork(save_timing_cache=...)`` → ``SaveEngine`` (see
:func:`engine_loader`), so parsing errors, profile checks, timing-cache locking and engine serialization are
Polygraphy's code, not ours.

* **Precision lives in the graph.** TensorRT 10.12 deprecated and 11.x removed the weak-typing builder flags
  (``BuilderFlag.FP16``), so an FP16 engine is built from the FP16 ONNX export as a *strongly typed* network:
  the flag is required on 10.x and accepted (ignored) on 11.x. Norms stay accurate because ONNX
  ``GroupNormalization``/``LayerNormalization`` compute their statistics in float32 (``stash_type``).
* **One optimization profile per requested shape range** (the sidecar's profiles), in the sidecar's order.
* **Timing cache reused between builds**: loaded before and appended to after every build (Polygraphy locks
  the file), one file per TensorRT version and GPU architecture.
* **Builder optimization level** (0–5) passed through.
* The engine is written atomically next to metadata recording the TensorRT version, GPU name and compute
  capability, the profiles, the source ONNX sha256 and the rank plan. :func:`load_trt_engine` refuses an
  engine whose metadata does not match the running TensorRT and GPU.
* Opset 23's native ``Attention`` needs TensorRT ≥ 10.14; older versions get the opset-18 export
  (:func:`opset_for_tensorrt`).

* **Refittable engines** (``options={"refittable": True}``, ``slimdiff-export --trt-refittable``: TensorRT's
  ``BuilderFlag.REFIT``) take new weights without a build (:meth:`TrtRunner.update_weights`): a ``trt.Refitter`` sets
  them by the ONNX initializer names the parser gave them, from the map :mod:`.weights` records at build time.

Everything that does not need TensorRT itself (profiles, metadata checks, opset choice) is plain Python and
is tested without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import SlimDiffError
from ..export.meta import status
from ..export.onnx import DEFAULT_OPSET, FALLBACK_OPSET
from ..export.shapes import Profile, tensor_profile
from .base import Backend, TritonModel, engine_outputs, register
from .weights import checked_state, initializer_arrays, load_weights_record, onnx_initializers

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) type-check the calls below; TensorRT itself is imported at run time
    import tensorrt as trt  # functions import it again once require_tensorrt() has passed: mypy reads the stubs there

NO_TENSORRT = ("TensorRT is not installed here (it needs an NVIDIA GPU and `pip install slimdiff[trt]`); "
               "use --engine ort or --engine aoti instead")
#: The first TensorRT whose ONNX parser accepts the opset-23 ``Attention`` op.
ATTENTION_OP_MIN_VERSION = (10, 14)
OPT_LEVELS = range(6)
ENV_KEYS = ("tensorrt_version", "gpu_name", "compute_capability")


def tensorrt_available() -> bool:
    """Whether TensorRT itself is installed. Its type stubs (``tensorrt-stubs``, for mypy) install a ``tensorrt``
    folder of ``.pyi`` files only, which Python imports as an empty namespace package: no origin."""
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None


def require_tensorrt() -> None:
    """The one-line error naming the alternatives, where TensorRT is not installed."""
    if not tensorrt_available():
        raise SlimDiffError(NO_TENSORRT)


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
    require_tensorrt()
    import tensorrt as trt

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
def _logger() -> trt.ILogger:
    """One process-wide logger: TensorRT objects keep a raw pointer to it, so it must outlive them all."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def engine_loader(onnx_path: Path, profiles: list[dict], engine_path: Path, *, opt_level: int,
                  timing_cache: Path, strongly_typed: bool, workspace_bytes: int | None = None,
                  refittable: bool = False):
    """Polygraphy's lazy loader chain that, when called, parses ``onnx_path`` (external data is found next to
    it), builds with one optimization profile per entry of ``profiles`` (input name → (min, opt, max)), reuses
    and extends ``timing_cache``, and saves the engine to ``engine_path`` (``refittable``: with
    ``BuilderFlag.REFIT``). Nothing runs until it is called."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine
    from polygraphy.backend.trt import Profile as TrtProfile

    trt_profiles = []
    for shapes in profiles:
        profile = TrtProfile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        trt_profiles.append(profile)
    limits = None
    if workspace_bytes:
        import tensorrt as trt

        limits = {trt.MemoryPoolType.WORKSPACE: workspace_bytes}
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
    config = CreateConfig(profiles=trt_profiles, load_timing_cache=str(timing_cache),
                          builder_optimization_level=opt_level, memory_pool_limits=limits, refittable=refittable)
    return SaveEngine(EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache)),
                      path=str(engine_path))


def build_trt_engine(onnx_path: Path, sidecar: dict, engine_path: Path, *, opt_level: int = 3,
                     timing_cache: Path | None = None, workspace_gib: float | None = None,
                     refittable: bool = False) -> dict:
    """Build a serialized engine at ``engine_path`` from ``onnx_path`` and its sidecar's profiles (``refittable``:
    one that takes new weights later); returns the runtime part of the engine metadata."""
    require_tensorrt()
    import tensorrt as trt

    if opt_level not in OPT_LEVELS:
        raise SlimDiffError(f"builder optimization level must be 0..5, got {opt_level}")
    env = current_environment()
    if sidecar["opset"] >= DEFAULT_OPSET and parse_version(env["tensorrt_version"])[:2] < ATTENTION_OP_MIN_VERSION:
        raise SlimDiffError(f"TensorRT {env['tensorrt_version']} cannot parse opset-{sidecar['opset']} Attention; "
                            f"export with --opset {FALLBACK_OPSET}")
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    profiles = optimization_profiles(sidecar)
    timing_cache = Path(timing_cache) if timing_cache else default_timing_cache(env)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    # Strongly typed (precision from the graph) where the flag exists: required on 10.x, the only mode on 11.x.
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    engine_path = Path(engine_path)
    tmp = engine_path.with_name(f".{engine_path.name}.tmp{os.getpid()}")
    loader = engine_loader(onnx_path, profiles, tmp, opt_level=opt_level, timing_cache=timing_cache,
                           strongly_typed=strongly_typed,
                           workspace_bytes=int(workspace_gib * 2**30) if workspace_gib else None,
                           refittable=refittable)
    status(f"building TensorRT engine from {Path(onnx_path).name} ({len(profiles)} profile(s), "
           f"optimization level {opt_level}); this takes minutes")
    t0 = time.perf_counter()
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):  # TensorRT's warnings and errors, not Polygraphy's narration
            loader()
        os.replace(tmp, engine_path)
    except PolygraphyException as exc:  # Polygraphy has logged TensorRT's own messages above
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "see the log above"
        raise SlimDiffError(f"TensorRT failed to build an engine from {Path(onnx_path).name}: {first}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    status(f"TensorRT engine {engine_path.name}: {engine_path.stat().st_size / 2**20:.1f} MiB in {seconds:.0f} s")
    return {
        **env,
        "builder_optimization_level": opt_level,
        "strongly_typed": strongly_typed,
        "refittable": refittable,
        "timing_cache": str(timing_cache),
        "tensor_profiles": [{n: [list(s) for s in v] for n, v in p.items()} for p in profiles],
        "build_seconds": round(seconds, 1),
        "files": [engine_path.name],
    }


def refit_arrays(record: dict, state: dict, dtype: torch.dtype, refittable: list[str],
                 exported: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a refit of an engine with the weights ``refittable`` (the Refitter's names) sets: each mapped initializer's
    new value, in the graph's layout and precision, and the graph's own value (``exported``: initializer name → the
    ONNX file's array) for the refittable weights no parameter holds — TensorRT asks for every weight it combined with
    a changed one (weights the parser made of no initializer are left as they are: should TensorRT need one, its
    missing weights say so). One line when new values would go to an initializer TensorRT holds no refittable weight
    of (folded into others at build)."""
    arrays = initializer_arrays(record, checked_state(record, state, dtype))
    names = set(refittable)
    lost = [name for name, a in arrays.items() if name not in names and not np.array_equal(a, exported[name])]
    if lost:
        param = record["initializers"][lost[0]][0]
        raise SlimDiffError(f"these weights change {param}, which TensorRT folded into other weights when it built "
                            "this engine: rebuild the engine from the new model")
    return {name: arrays[name] if name in arrays else exported[name] for name in refittable
            if name in arrays or name in exported}


def refit_engine(engine: trt.ICudaEngine, meta: dict, folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Refit the deserialized ``engine`` of ``meta`` in ``folder`` (built refittable) with ``state``; nothing may run
    on it meanwhile."""
    import onnx
    from onnx import numpy_helper

    require_tensorrt()
    import tensorrt as trt

    record = load_weights_record(meta, folder)
    source = Path(folder) / meta["source_onnx"]["file"]
    refitter = trt.Refitter(engine, _logger())
    refittable = refitter.get_all_weights()
    # the graph's own values, read for the names refit_arrays compares or fills in only (a UNet's are gigabytes)
    needed = set(refittable) ^ set(record["initializers"] or {})
    graph = onnx.load(str(source), load_external_data=False).graph
    exported = {init.name: numpy_helper.to_array(init, base_dir=str(folder))
                for init in graph.initializer if init.name in needed}
    arrays = refit_arrays(record, state, getattr(torch, meta["dtype"]), refittable, exported)
    for name, array in arrays.items():  # the arrays stay alive until the refit below returns
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise SlimDiffError(f"TensorRT refused new weights for {name} (shape {array.shape}, {array.dtype})")
    missing = refitter.get_missing_weights()
    if missing:
        raise SlimDiffError(f"TensorRT needs weights it was not given to refit this engine: {', '.join(missing[:3])}")
    if not refitter.refit_cuda_engine():
        raise SlimDiffError("TensorRT failed to refit the engine (see its log above)")


def load_trt_engine(engine_path: Path, runtime_meta: dict) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """``(runtime, engine)`` for a serialized engine whose metadata matches this TensorRT and GPU."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise SlimDiffError(f"TensorRT engine {str(engine_path)!r} is missing")
    require_tensorrt()
    check_environment(runtime_meta, current_environment(), engine_path)
    import tensorrt as trt

    runtime = trt.Runtime(_logger())
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise SlimDiffError(f"TensorRT could not deserialize {str(engine_path)!r}: the file is corrupt")
    return runtime, engine


@dataclass
class _TrtSlot:
    """Everything bound for one set of input shapes: static buffers and, optionally, a CUDA graph."""

    profile: int
    inputs: list[torch.Tensor]
    output: torch.Tensor | None  # set once the input shapes are bound (the output's follows from them)
    graph: torch.cuda.CUDAGraph | None = None


class TrtRunner:
    """A TensorRT engine on one execution context and one CUDA stream.

    Per input-shape combination it keeps static input/output buffers and — with ``cuda_graphs`` — a CUDA
    graph of the engine's launch, captured after one plain launch (TensorRT applies new shapes on the first
    enqueue) and replayed on later calls with the same shapes. Shapes select the first optimization profile
    that holds them.
    """

    def __init__(self, meta: dict, folder: Path, device: str, cuda_graphs: bool = True):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise SlimDiffError("TensorRT engines run on cuda devices only")
        torch.cuda.set_device(self.device)
        self.dtype = getattr(torch, meta["dtype"])
        self.meta, self.folder = meta, Path(folder)
        self.runtime, self.engine = load_trt_engine(self.folder / meta["file"], meta["runtime"])
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.names = [i["name"] for i in meta["inputs"]]
        if len(engine_outputs(meta)) > 1:  # the buffers and CUDA graphs below bind one output
            raise SlimDiffError(f"slimdiff runs single-output TensorRT engines; this {meta['component']} engine has "
                                f"several: serve it with Triton's tensorrt_plan backend (--triton-mode native)")
        self.output_name = meta["output"]
        self.profiles = [{n: tuple(tuple(s) for s in v) for n, v in p.items()}
                         for p in meta["runtime"]["tensor_profiles"]]
        self.cuda_graphs = cuda_graphs
        self._slots: dict[tuple, _TrtSlot] = {}
        self._active: tuple | None = None

    def _torch_dtype(self, name: str) -> torch.dtype:
        import tensorrt as trt  # loaded by __init__

        return torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def _activate(self, key: tuple, slot: _TrtSlot) -> None:
        """Point the context at ``slot``: its profile, input shapes and buffer addresses."""
        if self._active == key:
            return
        ctx = self.context
        ctx.set_optimization_profile_async(slot.profile, self.stream.cuda_stream)
        for name, buf in zip(self.names, slot.inputs):
            ctx.set_input_shape(name, tuple(buf.shape))
            ctx.set_tensor_address(name, buf.data_ptr())
        if slot.output is not None:
            ctx.set_tensor_address(self.output_name, slot.output.data_ptr())
            self._active = key

    def _launch(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise SlimDiffError("TensorRT failed to run the engine (see its log above)")

    def _new_slot(self, key: tuple, inputs: list[torch.Tensor]) -> _TrtSlot:
        profile = profile_for_shapes(self.profiles, dict(zip(self.names, key)))
        if profile < 0:
            raise SlimDiffError(f"input shapes {dict(zip(self.names, key))} fit none of the engine's profiles")
        bufs = [torch.empty(t.shape, dtype=self._torch_dtype(n), device=self.device) for n, t in zip(self.names, inputs)]
        slot = _TrtSlot(profile, bufs, None)
        self._active = None
        self._activate(key, slot)  # input shapes first: the output shape follows from them
        dims = self.context.get_tensor_shape(self.output_name)
        out_shape = tuple(dims[i] for i in range(len(dims)))  # Dims indexes like a tuple (its stub declares no __iter__)
        slot.output = torch.empty(out_shape, dtype=self._torch_dtype(self.output_name), device=self.device)
        self._activate(key, slot)
        # One plain launch applies the new shapes inside TensorRT; only then is the launch capturable.
        self._launch()
        self.stream.synchronize()
        if self.cuda_graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._launch()
            slot.graph = graph
        self._slots[key] = slot
        return slot

    def update_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Refit the engine with ``state`` (it must have been built refittable)."""
        torch.cuda.current_stream(self.device).synchronize()
        self.stream.synchronize()  # no launch may be pending while the engine is refitted
        refit_engine(self.engine, self.meta, self.folder, state)
        # CUDA graphs captured before may hold the old weights' addresses: captured again on their next call
        self._slots.clear()
        self._active = None

    def run(self, inputs: list[torch.Tensor], out_shape: tuple) -> torch.Tensor:
        key = tuple(tuple(t.shape) for t in inputs)
        slot = self._slots.get(key) or self._new_slot(key, inputs)
        self._activate(key, slot)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for buf, t in zip(slot.inputs, inputs):
                buf.copy_(t, non_blocking=True)
            if slot.graph is not None:
                slot.graph.replay()
            else:
                self._launch()
            assert slot.output is not None  # bound by _new_slot
            out = slot.output.clone()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out


@register
class TrtBackend(Backend):
    name = "trt"
    description = "TensorRT FP16 engine from the ONNX export (NVIDIA GPU)"
    file_pattern = "{name}.plan"
    updates_weights = writes_with_weights = True  # engines built refittable (cannot_update_weights)

    def unavailable(self, device):
        on_cuda = str(device).startswith("cuda")
        if not tensorrt_available():
            return NO_TENSORRT + ("" if on_cuda else f"; it also needs a CUDA device, and this run is on {device}")
        if not on_cuda:
            return f"TensorRT engines need a CUDA device (--device cuda); this run is on {device}"
        return None

    def onnx_opset(self):
        require_tensorrt()
        import tensorrt as trt

        return opset_for_tensorrt(trt.__version__)

    def needs_aligned_heads(self, device):
        return True  # TensorRT's fused MHA wants equal head widths, multiples of 8

    def weight_record(self, target, onnx_path, tensors):
        return onnx_initializers(onnx_path, tensors)

    def cannot_update_weights(self, meta):
        if not meta["runtime"].get("refittable"):
            return ("this TensorRT engine was built without refitting, so it cannot take new weights: rebuild it "
                    "with slimdiff-export --trt-refittable (or options={'refittable': True})")
        return None

    def build(self, component, target, *, onnx_path, sidecar, axes, dtype, device, options):
        # Looked up at call time, so tests can stand in for the builder (the only part that needs a GPU).
        return build_trt_engine(onnx_path, sidecar, target, **options)

    def open(self, meta, folder, device, cuda_graphs: bool = True, **options):
        return TrtRunner(meta, folder, device, cuda_graphs=cuda_graphs)

    def write_with_weights(self, meta, folder, state, out):
        reason = self.cannot_write_with_weights(meta)
        if reason:
            raise SlimDiffError(reason)
        runtime, engine = load_trt_engine(Path(folder) / meta["file"], meta["runtime"])  # the runtime outlives it
        refit_engine(engine, meta, folder, state)
        (Path(out) / meta["file"]).write_bytes(engine.serialize())
        del engine, runtime
        return {**meta["runtime"], "files": [meta["file"]]}

    def polygraphy_runner(self, meta, folder):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        check_environment(meta["runtime"], current_environment(), Path(folder) / meta["file"])
        return TrtRunner(EngineFromBytes(BytesFromPath(str(Path(folder) / meta["file"]))), name="tensorrt")

    def triton_model(self, meta):
        return TritonModel(model_file="model.plan", platform="tensorrt_plan")
