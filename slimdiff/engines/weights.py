"""New weights into a built engine: the record of how an engine holds its component's weights, and the checks an
update passes before any backend touches the engine.

``build_engine`` writes ``<component>.weights.json`` beside ``<component>.engine.json`` (declared there as
``weights``) for the denoisers and ControlNets (the models users swap weights of: another LoRA fused, a fine-tune of
the same shapes). It records, by the exported module's own state-dict names:

* ``shapes`` — every floating-point tensor's shape, which new weights must match;
* ``initializers`` (engines built from ONNX) — for each ONNX initializer that holds a parameter, that parameter and
  whether it is stored transposed: the exporter's optimiser renames and transposes some (``val_NN``), so names are
  matched by value against the module the graph was exported from;
* ``fixed`` — the parameters the engine does not take new values of (an initializer whose value several parameters
  share, such as norm weights that are all ones; a parameter folded into other constants), each with the sha256 of
  its exported value: an update is refused in one line when it would change one, and accepted when it leaves them as
  they were (a LoRA moves Linears, not norms).

:func:`checked_state` (every backend's ``update_weights`` starts with it) and :func:`initializer_arrays` (the ONNX
backends: the arrays under their graph names, in the graph's layout and dtype) read that record.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimDiffError
from ..export.meta import read_json, write_json_atomic

WEIGHTS_FORMAT = "slimdiff-engine-weights/1"
#: Why the engine keeps a parameter's exported value (the ``reason`` of a ``fixed`` entry).
SHARED_VALUE = "its exported value is shared by other parameters in the graph, which cannot tell them apart"
NOT_A_WEIGHT = "the engine holds no tensor of it alone (folded into other constants when it was built)"


def weights_path(folder: Path, component: str) -> Path:
    return Path(folder) / f"{component}.weights.json"


@dataclass(frozen=True)
class ExportedTensor:
    """A floating-point tensor of the exported module as the engine holds it (cast to its precision), by digest."""

    shape: tuple[int, ...]
    dtype: str  # numpy's dtype string
    sha256: str
    sha256_transposed: str | None  # a 2-D tensor's transpose: the exporter stores some MatMul weights transposed


def exported_tensors(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, ExportedTensor]:
    """The module's floating-point state as the engine holds it, digested one tensor at a time on the host (an SDXL
    or FLUX denoiser is never copied there whole)."""
    tensors = {}
    for name, t in module.state_dict().items():
        if t.is_floating_point():
            array = t.detach().to("cpu", dtype).contiguous().numpy()
            tensors[name] = ExportedTensor(array.shape, array.dtype.str, _digest(array),
                                           _digest(array.T) if array.ndim == 2 else None)
    return tensors


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def onnx_initializers(onnx_path: Path, tensors: dict[str, ExportedTensor]) -> tuple[dict, dict]:
    """``(initializers, fixed)`` of an ONNX graph exported from a module of ``tensors``: each initializer whose value
    one parameter has, as is or transposed, → ``[parameter, transposed]``; the parameters no such initializer holds
    → the reason (their values shared with other parameters, or folded away)."""
    import onnx
    from onnx import numpy_helper

    by_value: dict[tuple, list[tuple[str, bool]]] = defaultdict(list)
    for name, t in tensors.items():
        by_value[(t.shape, t.dtype, t.sha256)].append((name, False))
        if t.sha256_transposed is not None:
            by_value[(t.shape[::-1], t.dtype, t.sha256_transposed)].append((name, True))
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers: dict[str, list] = {}
    shared: set[str] = set()
    for init in graph.initializer:
        value = numpy_helper.to_array(init, base_dir=str(Path(onnx_path).parent))
        found = by_value.get((value.shape, value.dtype.str, _digest(value)), [])
        if len(found) == 1:
            initializers[init.name] = list(found[0])
        else:  # no parameter (a constant of the graph), or several: the graph cannot say whose it is
            shared.update(name for name, _ in found)
    held = {name for name, _ in initializers.values()}
    fixed = {name: SHARED_VALUE if name in shared else NOT_A_WEIGHT for name in tensors if name not in held}
    return initializers, fixed


def write_weights_record(folder: Path, component: str, tensors: dict[str, ExportedTensor], dtype: torch.dtype, *,
                         initializers: dict | None, fixed: dict[str, str]) -> dict:
    """Write ``<component>.weights.json``; returns what the engine metadata declares (``{"file": ...}``)."""
    path = weights_path(folder, component)
    write_json_atomic(path, {
        "format": WEIGHTS_FORMAT,
        "component": component,
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        "initializers": initializers,
        "fixed": {name: {"reason": reason, "sha256": tensors[name].sha256} for name, reason in fixed.items()},
    })
    return {"file": path.name}


def load_weights_record(meta: dict, folder: Path) -> dict:
    """The weights record of an engine; one line when the engine was exported before engines had one."""
    declared = meta.get("weights")
    if not declared:
        raise SlimDiffError(f"the {meta.get('engine')} engine in {str(folder)!r} was exported before engines recorded "
                            "how they hold their weights, so it cannot take new ones: re-export it with slimdiff-export")
    return read_json(Path(folder) / declared["file"], "engine weights record", WEIGHTS_FORMAT)


def checked_state(record: dict, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, np.ndarray]:
    """``state`` (the exported module's names) cast to the engine's precision, after checking it against the record:
    the same names and shapes (one line naming the first difference), and every parameter the engine keeps fixed
    left at its exported value."""
    shapes = record["shapes"]
    missing = [name for name in shapes if name not in state]
    extra = [name for name in state if name not in shapes]
    if missing or extra:
        first = f"{missing[0]!r} is missing" if missing else f"{extra[0]!r} is not one of the engine's weights"
        raise SlimDiffError(f"these weights do not fit the engine: {first} ({len(missing)} missing, {len(extra)} "
                            "unknown); it takes the weights of a model of the architecture (and rank plan) it was "
                            "exported from")
    for name, shape in shapes.items():
        if list(state[name].shape) != shape:
            raise SlimDiffError(f"these weights do not fit the engine: {name} has shape {tuple(state[name].shape)}, "
                                f"the engine's {tuple(shape)}")
    arrays = {name: state[name].detach().to("cpu", dtype).contiguous().numpy() for name in shapes}
    for name, fixed in record["fixed"].items():
        if _digest(arrays[name]) != fixed["sha256"]:
            raise SlimDiffError(f"these weights change {name}, which this engine cannot take new values of: "
                                f"{fixed['reason']}; re-export the engine from the new model")
    return arrays


def initializer_arrays(record: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Graph initializer name → its new value, in the graph's layout (transposed where the exporter transposed)."""
    if record.get("initializers") is None:
        raise SlimDiffError("this engine's weights record maps no ONNX initializers: re-export it with slimdiff-export")
    return {init: np.ascontiguousarray(arrays[name].T if transposed else arrays[name])
            for init, (name, transposed) in record["initializers"].items()}
