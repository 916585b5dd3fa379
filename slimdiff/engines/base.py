"""The engine backend interface, its registry, and the engine metadata file every backend writes.

A backend is one class in one file (:mod:`.ort`, :mod:`.trt`, :mod:`.aoti`), registered by name with
:func:`register` — in the spirit of Polygraphy's per-backend loader/runner folders. It knows how to

* **build** an engine for one exported component into a folder (from the ONNX export, or from the module),
  returning the runtime facts recorded in the metadata (versions, GPU, provider, files);
* **open** a built engine as a :class:`Runner` (``run(inputs, out_shape) -> Tensor`` on torch tensors);
* **take new weights** where it can (:attr:`Backend.updates_weights`: ``Runner.update_weights``, the weights of a model
  of the same architecture and shapes, without building again), by the record :mod:`.weights` writes at build time,
  and write the engine with them (:meth:`Backend.write_with_weights`: a served repository's next model version);
* **describe** itself: its engine file name, why it cannot run on a device here, the ONNX opset it wants;
* say how **Triton** serves it (:meth:`Backend.triton_model`), which :mod:`slimdiff.engines.triton` turns into
  a ``config.pbtxt``.

Export (``slimdiff-export``), the runtime (``EngineUNet``), the benchmark and the Triton repository all go
through :func:`get` / :func:`build_engine` / :func:`open_engine`; adding a backend is one more file.

An engine folder holds ``<component>.engine.json`` (format :data:`ENGINE_FORMAT`) beside the engine file(s):
the engine kind, files, precision, the shape axes and profiles it accepts, its inputs and input signature, the
UNet config a pipeline needs (``pipe.unet.config``) with its fingerprint, the rank plan for slim models, the
source ONNX hash, the backend's runtime facts, and — for backends Polygraphy can run — the engine's agreement
with its source graph (:mod:`.compare`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from ..errors import SlimDiffError
from ..export.meta import files_size, is_export_folder, read_json, write_json_atomic
from ..export.modules import Component
from ..export.onnx import DEFAULT_OPSET, FP32_TOLERANCE, load_sidecar
from ..fingerprint import config_fingerprint
from .weights import exported_tensors, write_weights_record

ENGINE_FORMAT = "slimdiff-engine/1"


class Runner(Protocol):
    """A loaded engine. ``inputs`` are on ``device`` in the engine's dtypes, in the order of the metadata's
    ``inputs``; ``out_shape`` lets a runner bind its output buffer ahead (None: the engine allocates it). The
    returned tensor belongs to the caller. Runners are not thread-safe on their own."""

    device: torch.device
    dtype: torch.dtype

    def run(self, inputs: list[torch.Tensor], out_shape: tuple | None) -> torch.Tensor: ...


class WeightUpdatingRunner(Runner, Protocol):
    """A runner of a backend whose :attr:`Backend.updates_weights` holds: ``update_weights`` puts ``state`` (the
    exported module's state dict: every floating-point tensor, by its names there) into the engine in place of the
    weights it was built with, checked first against the engine's weights record (:func:`.weights.checked_state`).
    Not thread-safe with ``run``: callers hold the same lock."""

    def update_weights(self, state: dict[str, torch.Tensor]) -> None: ...


class MultiOutputRunner(Runner, Protocol):
    """A runner of a backend whose :attr:`Backend.runs_several_outputs` holds: ``run`` returns an engine's first
    output, ``run_outputs`` all of them in the metadata's order (:func:`engine_outputs`)."""

    def run_outputs(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class TritonModel:
    """How Triton Inference Server serves an engine: ``platform`` or ``backend`` of its ``config.pbtxt`` and the
    name Triton looks for in the version folder (the engine's first file is copied under that name, the
    others keep theirs: ONNX external data is referenced by file name)."""

    model_file: str
    platform: str = ""
    backend: str = ""


class Backend:
    """One engine kind. Subclasses set the class attributes and implement :meth:`build` and :meth:`open`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: The engine file, ``{name}`` being the component (unet, text_encoder, vae_decoder).
    file_pattern: ClassVar[str] = ""
    #: Built from the component's ONNX export (else from the PyTorch module itself).
    from_onnx: ClassVar[bool] = True
    #: slimdiff's runner of these engines returns every output of an engine with several (``run_outputs``); the
    #: others run single-output engines only (Triton's own backends serve any).
    runs_several_outputs: ClassVar[bool] = False
    #: Its runners take new weights without a new build (:class:`WeightUpdatingRunner`); the engine records how it
    #: holds them at build time (:meth:`weight_record`).
    updates_weights: ClassVar[bool] = False
    #: It writes a built engine again with new weights, without an export (:meth:`write_with_weights`: a served
    #: repository's next model version).
    writes_with_weights: ClassVar[bool] = False

    def unavailable(self, device: str) -> str | None:
        """Why engines of this kind cannot be built or run on ``device`` here; None when they can."""
        return None

    def require(self, device: str) -> None:
        """Raise the one-line reason when this backend cannot work on ``device`` (before any slow work)."""
        reason = self.unavailable(device)
        if reason:
            raise SlimDiffError(reason)

    def onnx_opset(self) -> int:
        """The ONNX opset this backend's parser takes best."""
        return DEFAULT_OPSET

    def needs_aligned_heads(self, device: str) -> bool:
        """Whether attention head widths must be zero-padded to equal multiples of 8 (fused-attention kernels
        on CUDA want them; CPU kernels take any width, where padding would only cost time)."""
        return str(device).startswith("cuda")

    def engine_file(self, component: str) -> str:
        return self.file_pattern.format(name=component)

    def build(self, component: Component, target: Path, *, onnx_path: Path | None, sidecar: dict | None,
              axes: dict, dtype: torch.dtype, device: str, options: dict) -> dict:
        """Build the engine file ``target``; return the runtime facts, with ``files`` (``target``'s name first)."""
        raise NotImplementedError

    def open(self, meta: dict, folder: Path, device: str, **options) -> Runner:
        """A runner for the engine described by ``meta`` in ``folder`` (refusing one built for another runtime)."""
        raise NotImplementedError

    def weight_record(self, target: Path, onnx_path: Path | None, tensors: dict) -> tuple[dict | None, dict[str, str]]:
        """How the built engine ``target`` holds the exported module's ``tensors`` (name →
        :class:`~.weights.ExportedTensor`): ``(initializers, fixed)`` as :mod:`.weights` records them (initializers
        None for engines not built from ONNX)."""
        raise NotImplementedError

    def cannot_update_weights(self, meta: dict) -> str | None:
        """Why the engine of ``meta`` cannot take new weights (one line); None when it can."""
        if not self.updates_weights:
            return f"{self.description} engines cannot take new weights: re-export the engine from the new model"
        return None

    def cannot_write_with_weights(self, meta: dict) -> str | None:
        """Why the engine of ``meta`` cannot be written with new weights (:meth:`write_with_weights`; one line); None
        when it can."""
        reason = self.cannot_update_weights(meta)
        if reason is None and not self.writes_with_weights:
            reason = (f"{self.description} engines take new weights in a running process only; they cannot be "
                      "written with them: re-export the engine from the new model")
        return reason

    def write_with_weights(self, meta: dict, folder: Path, state: dict[str, torch.Tensor], out: Path) -> dict:
        """Write the engine of ``meta`` in ``folder`` with ``state``'s weights (the exported module's names, as
        :meth:`Runner.update_weights <WeightUpdatingRunner.update_weights>` takes them) into the empty folder ``out``,
        under the engine's file names, without an export; returns the runtime facts with ``files``. Backends whose
        :attr:`writes_with_weights` holds implement it."""
        raise SlimDiffError(self.cannot_write_with_weights(meta) or f"{self.name} engines are not written with weights")

    def polygraphy_runner(self, meta: dict, folder: Path):
        """A Polygraphy runner over the built engine (compared with its source ONNX after a build); None when
        Polygraphy has none for this backend."""
        return None

    def triton_model(self, meta: dict) -> TritonModel | None:
        """How Triton serves this engine natively; None when only the python backend can."""
        return None


_REGISTRY: dict[str, Backend] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend available by its ``name`` to export, runtime, bench and Triton."""
    if not cls.name or not cls.file_pattern:
        raise SlimDiffError(f"backend {cls.__name__} needs a name and a file pattern")
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SlimDiffError(f"unknown engine {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def names() -> list[str]:
    return list(_REGISTRY)


# ----------------------------------------------------------------------------------------------------------
# Metadata: build, read, open
# ----------------------------------------------------------------------------------------------------------


ENGINE_META_SUFFIX = ".engine.json"


def engine_meta_path(folder: Path, component: str = "unet") -> Path:
    return Path(folder) / f"{component}{ENGINE_META_SUFFIX}"


#: Config keys a slim UNet adds to its dense architecture: a slim engine belongs to the dense pipeline it drops into.
SLIM_CONFIG_KEYS = ("rank_plan",)


def architecture_fingerprint(unet_config) -> str:
    """The fingerprint an engine and a pipeline's UNet are matched by: the dense architecture's config (a slim
    UNet's rank plan left out)."""
    return config_fingerprint({k: v for k, v in dict(unet_config).items() if k not in SLIM_CONFIG_KEYS})


def input_signature(component: Component) -> list[dict]:
    """What a caller must feed, in order: names, dtypes (``model`` = the engine's floating precision) and ranks.
    An engine and a pipeline agree when their signatures are equal."""
    return [{"name": s.name, "dtype": s.dtype, "rank": len(s.dims)} for s in component.inputs]


def build_engine(kind: str, component: Component, folder: Path, *, axes: dict, profiles: list[dict],
                 dtype: torch.dtype, device: str, onnx_path: Path | None = None, extra: dict | None = None,
                 options: dict | None = None) -> dict:
    """Build one engine into ``folder`` with backend ``kind`` and write its metadata; returns the metadata.

    Backends built from ONNX take ``onnx_path`` (checked against its sidecar first); the others compile
    ``component`` directly. ``extra`` (variant, rank plan, UNet config) goes into the metadata as is, with the
    UNet config's fingerprint; ``options`` are the backend's own (TensorRT: ``opt_level``, ``timing_cache``, ``workspace_gib``).
    """
    backend = get(kind)
    folder = Path(folder)
    target = folder / backend.engine_file(component.name)
    source = sidecar = None
    if backend.from_onnx:
        if onnx_path is None:
            raise SlimDiffError(f"a {kind} engine is built from an ONNX export")
        sidecar = load_sidecar(onnx_path)
        source = {"file": str(Path(onnx_path).name), "sha256": sidecar["sha256"], "opset": sidecar["opset"]}
    runtime = backend.build(component, target, onnx_path=onnx_path, sidecar=sidecar, axes=axes, dtype=dtype,
                            device=device, options=options or {})
    files = runtime.pop("files")
    meta = {
        "format": ENGINE_FORMAT,
        "engine": kind,
        "component": component.name,
        "file": files[0],
        "files": files,
        "size_bytes": files_size([folder / f for f in files]),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "inputs": [{"name": s.name, "dims": list(s.dims),
                    "dtype": s.dtype if s.dtype != "model" else str(dtype).removeprefix("torch.")}
                   for s in component.inputs],
        "signature": input_signature(component),
        "output": component.output,
        # The output's dims as the ONNX graph declares them (ints, or names for dynamic axes).
        "output_dims": sidecar["outputs"][0]["dims"] if sidecar else None,
        # Every output (the first repeats output / output_dims, which engines written before had alone).
        "outputs": [{"name": o["name"], "dims": o["dims"]} for o in sidecar["outputs"]] if sidecar else
        [{"name": name, "dims": None} for name in component.outputs],
        "axes": axes,
        "profiles": profiles,
        "source_onnx": source,
        "runtime": runtime,
        **(extra or {}),
    }
    if "unet_config" in meta:  # what use_engine compares with the pipeline's UNet
        meta["config_fingerprint"] = architecture_fingerprint(meta["unet_config"])
    meta = json.loads(json.dumps(meta))  # what readers of the file get (tuples become lists)
    runner = backend.polygraphy_runner(meta, folder) if backend.from_onnx else None
    if runner is not None:
        from .compare import compare_with_onnx

        assert onnx_path is not None  # a backend built from ONNX has its graph
        check = compare_with_onnx(runner, onnx_path, component, {a: r["opt"] for a, r in axes.items()}, dtype)
        meta["parity_vs_onnx"] = check
        if dtype == torch.float32 and check["max_rel_error"] > FP32_TOLERANCE:
            for f in files:  # an engine that disagrees with its own source graph is not left behind
                (folder / f).unlink(missing_ok=True)
            raise SlimDiffError(f"the {kind} engine of {component.name} differs from its ONNX graph by "
                                f"{check['max_rel_error']:.2e} (relative; tolerance {FP32_TOLERANCE:.0e})")
    # Denoisers and ControlNets (with a config) are the models whose weights users swap: another LoRA fused, a fine-tune
    if "unet_config" in meta and backend.updates_weights:
        tensors = exported_tensors(component.module, dtype)
        initializers, fixed = backend.weight_record(target, onnx_path, tensors)
        meta["weights"] = write_weights_record(folder, component.name, tensors, dtype, initializers=initializers,
                                               fixed=fixed)
    write_json_atomic(engine_meta_path(folder, component.name), meta)
    return meta


def engine_outputs(meta: dict) -> list[dict]:
    """``[{"name", "dims"}]`` of every output of an engine, in order (dims None when not recorded)."""
    return meta.get("outputs") or [{"name": meta["output"], "dims": meta.get("output_dims")}]


def engine_components(folder: Path) -> list[str]:
    """The components whose engine metadata ``folder`` holds (:func:`engine_meta_path`), sorted."""
    return sorted(p.name.removesuffix(ENGINE_META_SUFFIX) for p in Path(folder).glob(f"*{ENGINE_META_SUFFIX}"))


def _what_is_there(folder: Path, component: str) -> str:
    """The hint after "not an engine folder": the engine folders of a ``slimdiff-export`` output folder, another
    component's engine, or how to build one."""
    if is_export_folder(folder):
        inside = [sub.name for sub in sorted(folder.iterdir()) if engine_meta_path(sub, component).is_file()]
        return (f"it is a slimdiff-export output folder, whose {component} engines are in its "
                f"{' and '.join(inside) or 'no'} folder{'s' if len(inside) != 1 else ''}")
    others = engine_components(folder)
    if others:
        return f"it holds the {', '.join(others)} engine, not the {component}'s"
    return "build one with slimdiff-export"


def load_engine_meta(path: Path, component: str = "unet") -> tuple[dict, Path]:
    """``(metadata, folder)`` from an engine folder or its ``.engine.json``; every listed file must exist."""
    path = Path(path)
    meta_file = path if path.suffix == ".json" else engine_meta_path(path, component)
    if meta_file is not path and not meta_file.is_file():
        raise SlimDiffError(f"{str(path)!r} is not an engine folder (no {meta_file.name}): "
                            f"{_what_is_there(path, component)}")
    meta = read_json(meta_file, "engine metadata", ENGINE_FORMAT)
    folder = meta_file.parent
    if meta.get("engine") not in _REGISTRY:
        raise SlimDiffError(f"engine metadata {str(meta_file)!r} names unknown engine {meta.get('engine')!r} "
                            f"(known: {', '.join(_REGISTRY)})")
    missing = [f for f in meta.get("files", []) if not (folder / f).is_file()]
    if missing or not meta.get("files"):
        raise SlimDiffError(f"engine in {str(folder)!r} is incomplete: {', '.join(missing) or 'no files listed'} missing")
    return meta, folder


def open_engine(meta: dict, folder: Path, device: str | None = None, **options) -> Runner:
    """The runner for an engine's metadata; ``device`` defaults to the one it was built for."""
    return get(meta["engine"]).open(meta, Path(folder), device or meta.get("device", "cpu"), **options)
