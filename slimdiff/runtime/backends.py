"""Engine backends: run one engine on torch tensors, reusing device buffers between calls.

Each backend exposes ``device``, ``dtype`` and ``run(inputs, out_shape) -> Tensor``. ``inputs`` are already
on the backend's device in the engine's dtypes; the returned tensor belongs to the caller (static output
buffers are copied out, because diffusers schedulers such as PNDM keep earlier outputs). Backends are not
thread-safe on their own: :class:`~slimdiff.runtime.EngineUNet` serialises calls with a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimDiffError

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _shape_key(inputs: list[torch.Tensor]) -> tuple:
    return tuple(tuple(t.shape) for t in inputs)


class OrtBackend:
    """ONNX Runtime on CPU or CUDA through an I/O binding: inputs are copied into buffers that stay bound
    across calls of the same shape, and the engine writes straight into a bound output buffer."""

    def __init__(self, meta: dict, folder: Path, device: str):
        from ..export.ort import make_session

        self.device = torch.device(device)
        self.dtype = getattr(torch, meta["dtype"])
        self.session = make_session(Path(folder) / meta["file"], device=device, already_optimized=True)
        self.names = [i["name"] for i in meta["inputs"]]
        self.output_name = meta["output"]
        self._key = None

    def _bind(self, key, inputs, out_shape):
        kind = self.device.type
        index = self.device.index or 0
        self._inputs = [torch.empty_like(t) for t in inputs]
        self._output = torch.empty(out_shape, dtype=self.dtype, device=self.device)
        binding = self.session.io_binding()
        for name, buf in zip(self.names, self._inputs):
            binding.bind_input(name, kind, index, _NUMPY[buf.dtype], tuple(buf.shape), buf.data_ptr())
        binding.bind_output(self.output_name, kind, index, _NUMPY[self.dtype], tuple(out_shape), self._output.data_ptr())
        self._binding, self._key = binding, key

    def run(self, inputs: list[torch.Tensor], out_shape: tuple) -> torch.Tensor:
        key = _shape_key(inputs)
        if key != self._key:
            self._bind(key, inputs, out_shape)
        for buf, t in zip(self._inputs, inputs):
            buf.copy_(t)
        if self.device.type == "cuda":
            # ONNX Runtime runs on its own CUDA stream: torch's copies must land first.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(self._binding)
        if self.device.type == "cuda":
            self._binding.synchronize_outputs()
        return self._output.clone()


class AotiBackend:
    """An AOTInductor package. Its outputs come from PyTorch's caching allocator, which already recycles
    device memory between calls, so no buffers are kept here."""

    def __init__(self, meta: dict, folder: Path, device: str):
        from ..export.aoti import load_aoti_package

        self.device = torch.device(device)
        self.dtype = getattr(torch, meta["dtype"])
        self.fn = load_aoti_package(Path(folder) / meta["file"], meta["runtime"], device)

    def run(self, inputs: list[torch.Tensor], out_shape: tuple) -> torch.Tensor:
        out = self.fn(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out


@dataclass
class _TrtSlot:
    """Everything bound for one set of input shapes: static buffers and, optionally, a CUDA graph."""

    profile: int
    inputs: list
    output: torch.Tensor | None
    graph: object = None


class TrtBackend:
    """A TensorRT engine on one execution context and one CUDA stream.

    Per input-shape combination it keeps static input/output buffers and — with ``cuda_graphs`` — a CUDA
    graph of the engine's launch, captured after one plain launch (TensorRT applies new shapes on the first
    enqueue) and replayed on later calls with the same shapes. Shapes select the first optimization profile
    that holds them.
    """

    def __init__(self, meta: dict, folder: Path, device: str, cuda_graphs: bool = True):
        from ..export.trt import load_trt_engine

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise SlimDiffError("TensorRT engines run on cuda devices only")
        torch.cuda.set_device(self.device)
        self.dtype = getattr(torch, meta["dtype"])
        self.runtime, self.engine = load_trt_engine(Path(folder) / meta["file"], meta["runtime"])
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.names = [i["name"] for i in meta["inputs"]]
        self.output_name = meta["output"]
        self.profiles = [{n: tuple(tuple(s) for s in v) for n, v in p.items()}
                         for p in meta["runtime"]["tensor_profiles"]]
        self.cuda_graphs = cuda_graphs
        self._slots: dict[tuple, _TrtSlot] = {}
        self._active = None

    def _torch_dtype(self, name: str) -> torch.dtype:
        import tensorrt as trt

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
        from ..export.trt import profile_for_shapes

        profile = profile_for_shapes(self.profiles, dict(zip(self.names, key)))
        if profile < 0:
            raise SlimDiffError(f"input shapes {dict(zip(self.names, key))} fit none of the engine's profiles")
        bufs = [torch.empty(t.shape, dtype=self._torch_dtype(n), device=self.device) for n, t in zip(self.names, inputs)]
        slot = _TrtSlot(profile, bufs, None)
        self._active = None
        self._activate(key, slot)  # input shapes first: the output shape follows from them
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
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

    def run(self, inputs: list[torch.Tensor], out_shape: tuple) -> torch.Tensor:
        key = _shape_key(inputs)
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
            out = slot.output.clone()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out


def open_backend(meta: dict, folder: Path, device: str | None = None, cuda_graphs: bool = True):
    """The backend for an engine's metadata; ``device`` defaults to the one it was built for."""
    device = device or meta.get("device", "cpu")
    kind = meta["engine"]
    if kind == "ort":
        return OrtBackend(meta, folder, device)
    if kind == "aoti":
        return AotiBackend(meta, folder, device)
    return TrtBackend(meta, folder, device, cuda_graphs=cuda_graphs)
