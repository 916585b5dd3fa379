"""ONNX Runtime backend: sessions on the CPU or CUDA execution provider, with the optimized graph saved.

The "engine" is ONNX Runtime's own optimized graph (``<name>.ort.onnx``), written next to the engine
metadata by a session that optimizes the portable export once; loading it later skips graph optimization.
ONNX Runtime's transformer fusion script (``onnxruntime.transformers.optimizer``) is deliberately not used: it
crashes on these opset-23 graphs, which already carry native fused ``Attention`` ops.

New weights (:meth:`OrtRunner.update_weights`): ONNX Runtime cannot change a session's weights in place, so the runner
opens a new session on the unoptimised export the engine folder keeps (``<name>.onnx``), its initializers overridden
with the new values (``SessionOptions.add_initializer``; the optimized graph has folded and renamed them), and drops
the old one. Written with new weights (:meth:`OrtBackend.write_with_weights`), the engine is built again from a copy
of that export holding them: ONNX Runtime saves an optimized graph with its source's values, not a session's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import SlimDiffError
from ..export.ort_session import make_session, ort_unavailable
from .base import Backend, TritonModel, engine_outputs, register
from .weights import checked_state, initializer_arrays, load_weights_record, onnx_initializers


def build_ort_engine(onnx_path: Path, engine_path: Path, *, device: str = "cpu") -> dict:
    """Optimize ``onnx_path`` for ``device`` and save the result as ``engine_path``; returns runtime metadata."""
    import onnxruntime as ort

    session = make_session(onnx_path, device=device, optimized_out=engine_path)
    if not Path(engine_path).is_file():
        raise SlimDiffError(f"ONNX Runtime did not write its optimized model to {str(engine_path)!r}")
    data = Path(engine_path).with_name(Path(engine_path).name + ".data")
    return {
        "onnxruntime_version": ort.__version__,
        "provider": session.get_providers()[0],
        "device": str(device),
        "files": [Path(engine_path).name] + ([data.name] if data.exists() else []),
    }


def build_ort_engine_with(source: Path, initializers: dict[str, np.ndarray], engine_path: Path, *,
                          device: str = "cpu") -> dict:
    """:func:`build_ort_engine` of the export ``source`` with the ``initializers`` named there replaced (name → array
    in the graph's layout): ONNX Runtime saves its optimized graph with the source's initializers, not those a
    session overrides, so the new values go into a copy of the source first (its weights file too, for a large
    graph; deleted after the build). The graph is in memory whole beside the new values and the model they came from:
    several times its size at the peak."""
    import onnx
    from onnx import numpy_helper

    source, engine_path = Path(source), Path(engine_path)
    model = onnx.load(str(source))  # with its external weights: each initializer is either replaced or written back
    for init in model.graph.initializer:
        if init.name in initializers:
            init.CopyFrom(numpy_helper.from_array(initializers[init.name], init.name))
    staged = engine_path.with_name(f".{source.stem}.new-weights.onnx")
    external = source.with_name(source.name + ".data").exists()
    try:
        onnx.save_model(model, str(staged), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=staged.name + ".data")
        del model
        return build_ort_engine(staged, engine_path, device=device)
    finally:
        staged.unlink(missing_ok=True)
        staged.with_name(staged.name + ".data").unlink(missing_ok=True)


def _source_export(meta: dict, folder: Path) -> Path:
    """The unoptimised export an ONNX Runtime engine folder keeps: new weights are built from it."""
    source = Path(folder) / meta["source_onnx"]["file"]
    if not source.is_file():
        raise SlimDiffError(f"the engine folder {str(folder)!r} lacks its source export {source.name!r}, which "
                            "ONNX Runtime builds an engine with new weights from: re-export the engine")
    return source


def _new_initializers(meta: dict, folder: Path, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    record = load_weights_record(meta, folder)
    return initializer_arrays(record, checked_state(record, state, getattr(torch, meta["dtype"])))


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OrtRunner:
    """ONNX Runtime on CPU or CUDA through an I/O binding: inputs are copied into buffers that stay bound
    across calls of the same shapes, and the engine writes straight into a bound output buffer (an engine with
    several outputs: into buffers ONNX Runtime allocates)."""

    def __init__(self, meta: dict, folder: Path, device: str):
        self.device = torch.device(device)
        self.dtype = getattr(torch, meta["dtype"])
        self.meta, self.folder = meta, Path(folder)
        self.session = make_session(self.folder / meta["file"], device=device, already_optimized=True)
        self.names = [i["name"] for i in meta["inputs"]]
        self.output_names = [o["name"] for o in engine_outputs(meta)]
        self.output_name = self.output_names[0]
        self._key = None

    def update_weights(self, state: dict[str, torch.Tensor]) -> None:
        """A new session from the engine's source export with ``state``'s values as its initializers."""
        import onnxruntime as ort

        source = _source_export(self.meta, self.folder)
        arrays = _new_initializers(self.meta, self.folder, state)
        # ONNX Runtime reads these buffers for as long as the session lives: the runner keeps them
        values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        self.session = make_session(source, device=str(self.device), initializers=values)
        self._initializers = (arrays, values)
        self._key = None  # the old session's binding

    def _bind(self, key, inputs, out_shape):
        kind = self.device.type
        index = self.device.index or 0
        # contiguous buffers whatever the inputs' layout: the binding hands ONNX Runtime their bare memory
        self._inputs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in inputs]
        binding = self.session.io_binding()
        for name, buf in zip(self.names, self._inputs):
            binding.bind_input(name, kind, index, _NUMPY[buf.dtype], tuple(buf.shape), buf.data_ptr())
        if out_shape is None or len(self.output_names) > 1:  # output shapes unknown here: ONNX Runtime allocates
            self._output = None
            for name in self.output_names:
                binding.bind_output(name, kind, index)
        else:
            self._output = torch.empty(out_shape, dtype=self.dtype, device=self.device)
            binding.bind_output(self.output_name, kind, index, _NUMPY[self.dtype], tuple(out_shape),
                                self._output.data_ptr())
        self._binding, self._key = binding, key

    def run(self, inputs: list[torch.Tensor], out_shape: tuple | None) -> torch.Tensor:
        self._execute(inputs, out_shape)
        if self._output is None:
            return torch.from_numpy(self._binding.copy_outputs_to_cpu()[0]).to(self.device)
        # A copy: schedulers such as PNDM keep earlier outputs, and the bound buffer is rewritten next call.
        return self._output.clone()

    def run_outputs(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every output of the engine, in its metadata's order."""
        self._execute(inputs, None)
        return [torch.from_numpy(a).to(self.device) for a in self._binding.copy_outputs_to_cpu()]

    def _execute(self, inputs: list[torch.Tensor], out_shape: tuple | None) -> None:
        key = (tuple(tuple(t.shape) for t in inputs), out_shape)
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


@register
class OrtBackend(Backend):
    name = "ort"
    description = "ONNX Runtime (opset-23 export, saved optimized graph; CPU or CUDA)"
    file_pattern = "{name}.ort.onnx"
    runs_several_outputs = True
    updates_weights = writes_with_weights = True

    def unavailable(self, device):
        return ort_unavailable(device)

    def weight_record(self, target, onnx_path, tensors):
        return onnx_initializers(onnx_path, tensors)

    def build(self, component, target, *, onnx_path, sidecar, axes, dtype, device, options):
        return build_ort_engine(onnx_path, target, device=device)

    def open(self, meta, folder, device, **options):
        return OrtRunner(meta, folder, device)

    def write_with_weights(self, meta, folder, state, out):
        source = _source_export(meta, folder)
        return build_ort_engine_with(source, _new_initializers(meta, folder, state), Path(out) / meta["file"],
                                     device=meta["device"])

    def polygraphy_runner(self, meta, folder):
        import onnxruntime as ort
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        provider = "cuda" if str(meta["device"]).startswith("cuda") else "cpu"
        return OnnxrtRunner(SessionFromOnnx(str(Path(folder) / meta["file"]), providers=[provider],
                                            graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                            name=f"ort-engine-{provider}")

    def triton_model(self, meta):
        # The saved optimized graph (EXTENDED level: portable between machines), its weights file kept by name.
        return TritonModel(model_file="model.onnx", backend="onnxruntime")
