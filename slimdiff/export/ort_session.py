"""ONNX Runtime sessions: the export's parity check and the ``ort`` engine backend both run graphs through
this one session factory (same providers, same optimization level)."""

from __future__ import annotations

from pathlib import Path

from ..errors import SlimDiffError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def has_cuda() -> bool:
    """Whether this ONNX Runtime has the CUDA execution provider (onnxruntime-gpu)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def ort_unavailable(device: str) -> str | None:
    """Why ONNX Runtime cannot run on ``device`` here (one line), or None."""
    import onnxruntime as ort

    kind = str(device).split(":")[0]
    if kind not in PROVIDERS:
        return f"ONNX Runtime engines run on cpu or cuda, not {device!r}"
    if PROVIDERS[kind][0] not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} here has no {PROVIDERS[kind][0]} (install onnxruntime-gpu for "
                f"cuda); available: {', '.join(ort.get_available_providers())}")
    return None


def providers_for(device: str) -> list:
    """The execution providers for ``device`` (``cpu``, ``cuda``, ``cuda:N``), or the one-line reason why not."""
    reason = ort_unavailable(device)
    if reason:
        raise SlimDiffError(reason)
    if str(device).startswith("cuda"):
        index = int(str(device).split(":")[1]) if ":" in str(device) else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return PROVIDERS["cpu"]


def make_session(model_path: Path, *, device: str = "cpu", optimized_out: Path | None = None,
                 already_optimized: bool = False, initializers: dict | None = None):
    """An ``InferenceSession`` for ``model_path``; with ``optimized_out`` ONNX Runtime also writes its optimized
    graph there (weights as external data when the source has them). ``initializers`` (name → ``OrtValue``, which the
    caller keeps alive as long as the session) replace the graph's initializers of those names."""
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
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
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
