"""ONNX export of dense and slim denoisers (UNets, the PixArt transformer), the text encoder and the VAE decoder.

* ``torch.export`` and torch's ONNX exporter (``torch.onnx.export(program, ..., dynamo=True)``; ``squeeze(dim)``
  decomposed first as PyTorch means it, see :func:`_squeeze_dim`). At **opset 23** (default) every SDPA
  becomes one native ``Attention`` op — including slim attentions whose q·k and v head widths differ, with
  the original softmax ``scale`` as an attribute — and group norm / GELU become ``GroupNormalization`` /
  ``Gelu``. At **opset 18** (fallback for TensorRT before 10.14) attention is decomposed into
  MatMul-Softmax-MatMul, which TensorRT's MHA fusion recognises.
* Dynamic batch, latent height/width (multiples of 8) and token axes; their min/opt/max go to a JSON sidecar
  ``<file>.onnx.json`` together with op counts, hashes and the parity result.
* Graphs over 2 GB keep their weights in ``<file>.onnx.data`` (external data).
* Cleanup with onnxslim (no hand-written graph passes).
* A parity check against PyTorch with ONNX Runtime after every export: fp32 must be within
  :data:`FP32_TOLERANCE` (relative to the output's largest magnitude); fp16 error is reported.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimDiffError
from .cache import cache_folder, export_key, keep, reuse
from .meta import read_json, sha256_files, status, write_json_atomic
from .modules import (
    MODEL_DTYPE,
    Component,
    component_axes,
    example_values,
    parity_shapes,
    torch_dynamic_shapes,
)
from .ort_session import make_session
from .shapes import PAIRED_AXES, Profile, union

DEFAULT_OPSET = 23  # native Attention / GroupNormalization / Gelu
FALLBACK_OPSET = 18  # decomposed attention for TensorRT < 10.14
OPSETS = (DEFAULT_OPSET, FALLBACK_OPSET)
FUSED_OPS = ("Attention", "GroupNormalization", "Gelu")
FP32_TOLERANCE = 1e-4
SIDECAR_FORMAT = "slimdiff-onnx/1"
# Protobuf refuses messages of 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**27


def sidecar_path(onnx_path: Path) -> Path:
    return Path(onnx_path).with_name(Path(onnx_path).name + ".json")


def onnx_files(onnx_path: Path) -> list[Path]:
    """The graph file and, when present, its external-data file."""
    onnx_path = Path(onnx_path)
    data = onnx_path.with_name(onnx_path.name + ".data")
    return [onnx_path, data] if data.exists() else [onnx_path]


def op_counts(model) -> dict[str, int]:
    counts = Counter(n.op_type for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _value_info(value) -> dict:
    import onnx

    t = value.type.tensor_type
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "dims": [d.dim_param or d.dim_value for d in t.shape.dim]}


def _squeeze_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.squeeze(dim)`` as the reshape torch means by it: the exporter's own translation squeezes the axis
    whatever its size, which ONNX refuses when it is not 1 (PixArt squeezes its token axis, no-op in PyTorch)."""
    return x.reshape([size for i, size in enumerate(x.shape) if i != dim % x.ndim or size != 1])


def _squeezes_a_wide_axis(exported) -> bool:
    """Whether the program squeezes an axis that is not of size 1 (what :func:`_squeeze_dim` must rewrite)."""
    for node in exported.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.squeeze.dim:
            shape = node.args[0].meta["val"].shape
            if shape[node.args[1]] != 1:
                return True
    return False


def export_onnx(component: Component, profiles: list[Profile], out_path: Path, *, opset: int = DEFAULT_OPSET,
                dtype: torch.dtype = torch.float32, multiples: dict[str, int] | None = None,
                parity_device: str = "cpu", extra: dict | None = None) -> dict:
    """Export ``component`` to ``out_path`` (+ ``.data`` when large) and write its sidecar; return the sidecar.

    ``profiles`` are kept for TensorRT; the graph's dynamic ranges cover all of them. ``multiples`` says what
    latent height/width must be divisible by (default 8). ``extra`` is merged into the sidecar (rank plan,
    variant). Raises :class:`SlimDiffError` when the export fails or fp32 parity is out of tolerance.
    """
    import onnx
    import onnxslim

    if opset not in OPSETS:
        raise SlimDiffError(f"opset {opset} is not supported: use {DEFAULT_OPSET} (fused ops) "
                            f"or {FALLBACK_OPSET} (decomposed attention, older TensorRT)")
    if dtype not in (torch.float32, torch.float16):
        raise SlimDiffError(f"ONNX export supports float32 and float16, not {dtype}")
    out_path = Path(out_path)
    multiples = {"height": 8, "width": 8, **(multiples or {})}
    axes = component_axes(component, union(profiles), multiples)
    for a in ("height", "width", *PAIRED_AXES):
        if a in axes and any(axes[a][k] % axes[a]["multiple"] for k in ("min", "opt", "max")):
            raise SlimDiffError(f"{component.name}: latent {a} {axes[a]} must be multiples of {axes[a]['multiple']}")
    reference = component.module
    # the weights' bytes as exported: float16 exports convert a copy of the reference first
    n_bytes = sum(p.numel() * (p.element_size() if dtype == torch.float32 else dtype.itemsize)
                  for p in reference.parameters())
    cache = cache_folder() if n_bytes <= EXTERNAL_DATA_BYTES else None
    key = export_key(component, axes, opset, dtype, parity_device) if cache else None
    if cache and key and (stored := reuse(cache, key, out_path)) is not None:
        # the graph follows the profiles' union (the key's axes); TensorRT builds this run's profiles from the sidecar
        sidecar = {**stored, "file": out_path.name, "files": [out_path.name], "reused_export": key,
                   "profiles": [p.to_json() for p in profiles], **(extra or {})}
        write_json_atomic(sidecar_path(out_path), sidecar)
        status(f"{component.name}: an identical export reused from {cache}: {sidecar['ops']['total']} ONNX nodes, "
               f"fused {sidecar['fused']}, parity max abs error {sidecar['parity']['max_abs_error']:.2e} when made")
        return sidecar
    device = next(reference.parameters()).device
    module = copy.deepcopy(reference).to(dtype) if dtype != torch.float32 else reference
    example = component.random_inputs(example_values(axes), dtype, seed=0, device=device)
    raw = out_path.with_name(f".{out_path.stem}.raw.onnx")

    status(f"exporting {component.name} to ONNX (opset {opset}, {str(dtype).removeprefix('torch.')}, "
           f"{n_bytes / 2**20:.0f} MiB of weights)")
    t0 = time.perf_counter()
    try:
        dynamic_shapes = torch_dynamic_shapes(component, axes)
        exported = torch.export.export(module, tuple(example), dynamic_shapes=dynamic_shapes)
        if _squeezes_a_wide_axis(exported):  # re-tracing costs as much as the export: only where needed
            exported = exported.run_decompositions({torch.ops.aten.squeeze.dim: _squeeze_dim})
        with warnings.catch_warnings():
            # dynamic_shapes here only name the graph's axes after ours; inputs sharing an axis share its name,
            # which the exporter remarks on once per input
            warnings.filterwarnings("ignore", message="# The axis name")
            program = torch.onnx.export(
                exported, tuple(example), dynamo=True, opset_version=opset, verbose=False,
                dynamic_shapes=dynamic_shapes,
                input_names=[s.name for s in component.inputs], output_names=list(component.outputs),
            )
        del exported
        if n_bytes > EXTERNAL_DATA_BYTES:
            # Weights go to unet.onnx.data. onnxslim is skipped here: it sizes the whole model as one protobuf
            # message, which fails past 2 GB; the exporter's own optimizer (folding, dead code) has run.
            program.save(str(out_path), external_data=True)
            cleanup = "torch.onnx optimizer (onnxslim skipped: over 2 GB)"
        else:
            program.save(str(raw))
            # Given a ModelProto (not a path) onnxslim returns the cleaned graph without printing its table.
            onnx.save_model(onnxslim.slim(onnx.load(str(raw))), str(out_path))
            cleanup = "torch.onnx optimizer + onnxslim"
        del program
    except SlimDiffError:
        raise
    except Exception as exc:  # the exporter raises many types; the user gets the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimDiffError(f"ONNX export of {component.name} at opset {opset} failed: {first}") from exc
    finally:
        raw.unlink(missing_ok=True)
        if module is not reference:
            del module
    seconds = time.perf_counter() - t0

    graph = onnx.load(str(out_path), load_external_data=False)
    counts = op_counts(graph)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "component": component.name,
        "file": out_path.name,
        "files": [p.name for p in onnx_files(out_path)],
        "external_data": len(onnx_files(out_path)) > 1,
        "opset": opset,
        "cleanup": cleanup,
        "dtype": str(dtype).removeprefix("torch."),
        "inputs": [_value_info(v) for v in graph.graph.input],
        "outputs": [_value_info(v) for v in graph.graph.output],
        "axes": axes,
        "input_axes": {spec.name: list(spec.dims) for spec in component.inputs},
        "profiles": [p.to_json() for p in profiles],
        "ops": {"total": sum(counts.values()), **counts},
        "attention_modules": component.attention_modules,
        "fused": {op: counts.get(op, 0) for op in FUSED_OPS},
        "parameters": sum(p.numel() for p in reference.parameters()),
        "export_seconds": round(seconds, 1),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxslim": onnxslim.__version__},
    }
    if opset >= 23 and counts.get("Attention", 0) < component.attention_modules:
        status(f"note: only {counts.get('Attention', 0)} of {component.attention_modules} attentions "
               "became fused Attention ops")
    sidecar["sha256"] = sha256_files(onnx_files(out_path))
    try:
        sidecar["parity"] = check_parity(out_path, component, axes, dtype, device=parity_device)
    except SlimDiffError:
        for p in onnx_files(out_path):  # a graph that failed its check is not left behind
            p.unlink()
        raise
    if cache and key:
        keep(cache, key, out_path, sidecar)
    sidecar.update(extra or {})
    write_json_atomic(sidecar_path(out_path), sidecar)
    status(f"{component.name}: {sidecar['ops']['total']} ONNX nodes, fused {sidecar['fused']}, "
           f"parity max abs error {sidecar['parity']['max_abs_error']:.2e} "
           f"(relative {sidecar['parity']['max_rel_error']:.2e}) in {seconds:.0f} s")
    return sidecar


def check_parity(onnx_path: Path, component: Component, axes: dict[str, dict], dtype: torch.dtype,
                 *, device: str = "cpu", seed: int = 1) -> dict:
    """Run the graph with ONNX Runtime and ``component.module`` (the fp32 PyTorch reference) on seeded random
    inputs at :func:`parity_shapes`; raise when fp32 is off by more than :data:`FP32_TOLERANCE` relative."""
    session = make_session(onnx_path, device=device)
    reference = component.module
    ref_device = next(reference.parameters()).device
    ref_dtype = next(reference.parameters()).dtype
    worst_abs = worst_rel = 0.0
    shapes = parity_shapes(axes)
    for i, values in enumerate(shapes):
        feeds = component.random_inputs(values, dtype, seed=seed + i)
        with torch.no_grad():
            ref_inputs = [t.to(ref_device, ref_dtype) if spec.dtype == MODEL_DTYPE else t.to(ref_device)
                          for t, spec in zip(feeds, component.inputs)]
            refs = reference(*ref_inputs)
        refs = refs if isinstance(refs, tuple) else (refs,)
        try:
            gots = session.run(list(component.outputs), {s.name: t.numpy() for s, t in zip(component.inputs, feeds)})
        except Exception as exc:
            raise SlimDiffError(f"ONNX Runtime could not run {Path(onnx_path).name} at {values}: "
                                f"{str(exc).strip().splitlines()[0]}") from exc
        for name, got, ref in zip(component.outputs, gots, refs):
            ref = ref.float().cpu().numpy()
            if got.shape != ref.shape:
                raise SlimDiffError(f"{component.name}: ONNX output {name} shape {got.shape} != PyTorch {ref.shape} "
                                    f"at {values}")
            err = float(np.abs(got.astype(np.float64) - ref).max())
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / max(float(np.abs(ref).max()), 1e-12))
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else None
    result = {"provider": session.get_providers()[0], "shapes": shapes, "max_abs_error": worst_abs,
              "max_rel_error": worst_rel, "tolerance": tolerance}
    if tolerance is not None and worst_rel > tolerance:
        raise SlimDiffError(f"{component.name}: ONNX Runtime output differs from PyTorch by {worst_rel:.2e} "
                            f"(relative; tolerance {tolerance:.0e}) — the export is wrong")
    return result


def load_sidecar(onnx_path: Path) -> dict:
    """The sidecar of an exported graph, checked against the files it describes."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise SlimDiffError(f"ONNX file {str(onnx_path)!r} is missing")
    body = read_json(sidecar_path(onnx_path), "ONNX sidecar", SIDECAR_FORMAT)
    files = [onnx_path.with_name(n) for n in body.get("files", [onnx_path.name])]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise SlimDiffError(f"ONNX export {str(onnx_path)!r} is incomplete: {', '.join(missing)} missing")
    if sha256_files(files) != body.get("sha256"):
        raise SlimDiffError(f"ONNX file {str(onnx_path)!r} does not match its sidecar (changed or corrupt); "
                            "export it again")
    return body
