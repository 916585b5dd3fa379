"""ONNX Runtime engines: sessions on the CPU or CUDA execution provider, with the optimized graph saved.

The "engine" is ONNX Runtime's own optimized graph (``<name>.ort.onnx``), written next to the engine
metadata by a session that optimizes the portable export once; loading it later skips graph optimization.
ONNX Runtime's transformer fusion script (``onnxruntime.transformers.optimizer``) is deliberately not used: it
crashes on these opset-23 graphs, which already carry native fused ``Attention`` ops.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SlimDiffError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    kind = str(device).split(":")[0]
    if kind not in PROVIDERS:
        raise SlimDiffError(f"ONNX Runtime engines run on cpu or cuda, not {device!r}")
    wanted = PROVIDERS[kind]
    if wanted[0] not in ort.get_available_providers():
        raise SlimDiffError(f"ONNX Runtime here has no {wanted[0]} (install onnxruntime-gpu for cuda); "
                            f"available: {', '.join(ort.get_available_providers())}")
    if kind == "cuda":
        index = int(str(device).split(":")[1]) if ":" in str(device) else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return wanted


def make_session(model_path: Path, *, device: str = "cpu", optimized_out: Path | None = None,
                 already_optimized: bool = False):
    """An ``InferenceSession`` for ``model_path``; with ``optimized_out`` ONNX Runtime also writes its optimized
    graph there (weights as external data when the source has them)."""
    import onnxruntime as ort

    model_path = Path(model_path)
    if not model_path.is_file():
        raise SlimDiffError(f"ONNX file {str(model_path)!r} is missing")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    if already_optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    else:
        # EXTENDED, not ALL: ALL adds CPU-layout (NCHWc) rewrites that tie the saved graph to this CPU.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if optimized_out is not None:
        options.optimized_model_filepath = str(optimized_out)
        if model_path.with_name(model_path.name + ".data").exists():
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             Path(optimized_out).name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers_for(device))
    except SlimDiffError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for damaged graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimDiffError(f"ONNX Runtime cannot load {str(model_path)!r}: {first}") from exc


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
