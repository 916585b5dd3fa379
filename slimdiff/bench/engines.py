"""Engines the benchmark can run a UNet on, behind one small interface.

An engine turns a UNet into a runner ``run(sample, timestep, encoder_hidden_states) -> noise prediction``
(torch tensors on the benchmark device; ``timestep`` is float32 of shape (batch,), as the exported graphs take
it). ``unavailable(device)`` says why an engine cannot run here — the harness reports that reason instead of
leaving the engine out. New engines plug in with :func:`register`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import SlimDiffError
from .timing import cuda_graphed, is_cuda

Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Built:
    run: Runner
    files: list[Path] = field(default_factory=list)  # engine artifacts on disk (their size is reported)
    info: dict = field(default_factory=dict)


class Engine:
    name = ""
    description = ""

    def __init__(self, **options):
        self.options = options

    def unavailable(self, device: str) -> str | None:
        """Why this engine cannot run on ``device`` here, or None when it can."""
        return None

    def build(self, unet: nn.Module, batches: list[int], latent: tuple[int, int], text_len: int,
              workdir: Path) -> Built:
        """An engine for ``unet`` that accepts every batch size in ``batches`` at one latent size."""
        raise NotImplementedError


def _torch_runner(forward) -> Runner:
    def run(sample, timestep, context):
        return forward(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    return run


class EagerEngine(Engine):
    name = "eager"
    description = "PyTorch eager (diffusers modules, SDPA attention)"

    def build(self, unet, batches, latent, text_len, workdir):
        # The bound forward, not the module: the harness re-routes the module's calls inside pipelines.
        return Built(_torch_runner(unet.forward), info={"attention": "scaled_dot_product_attention"})


class CudaGraphEngine(Engine):
    name = "cudagraph"
    description = "PyTorch eager replayed from a CUDA graph per input shape (no per-kernel launch cost)"

    def unavailable(self, device):
        return None if is_cuda(device) else "CUDA graphs need a CUDA device; this run is on the CPU"

    def build(self, unet, batches, latent, text_len, workdir):
        graphs = {}

        def run(sample, timestep, context):
            key = (tuple(sample.shape), tuple(timestep.shape), tuple(context.shape))
            if key not in graphs:
                static = (sample.clone(), timestep.clone(), context.clone())
                graphs[key] = static, cuda_graphed(
                    lambda: unet(static[0], static[1], encoder_hidden_states=static[2], return_dict=False)[0],
                    sample.device)
            (s, t, c), replay = graphs[key]
            s.copy_(sample)
            t.copy_(timestep)
            c.copy_(context)
            # The graph writes every replay into the same memory; schedulers may keep an output across calls.
            return replay().clone()

        return Built(run, info={"attention": "scaled_dot_product_attention", "cuda_graph": "one per input shape"})


class CompileEngine(Engine):
    name = "compile"
    description = "torch.compile (Inductor)"

    def unavailable(self, device):
        if importlib.util.find_spec("triton") is None and is_cuda(device):
            return "torch.compile on CUDA needs Triton, which is not installed"
        return None

    def build(self, unet, batches, latent, text_len, workdir):
        cuda = is_cuda(next(unet.parameters()).device)
        # "reduce-overhead" on CUDA (Inductor kernels + CUDA graphs); Inductor's default on the CPU.
        # "max-autotune" (GEMM template search) is an option: it took over 6 minutes for the SD-1.5 UNet on an
        # H100 (bench/results/2026-11-22-h100), more than a GPU session's suite can spend per model.
        mode = self.options.get("compile_mode") or ("reduce-overhead" if cuda else "default")
        # Models are measured one after another and never revisited: dropping Dynamo's caches keeps each new
        # model from counting against the recompile limit of the shared UNet forward code.
        torch._dynamo.reset()
        compiled = torch.compile(unet.forward, mode=mode, dynamic=False, fullgraph=False)
        mark_step = cuda and mode in ("max-autotune", "reduce-overhead")

        def run(sample, timestep, context):
            if not mark_step:
                return compiled(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
            # CUDA graphs replay into the same output memory: mark each call as a new step and hand out a
            # copy, since schedulers may keep a model output across calls (as the engine runtime does).
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(sample, timestep, encoder_hidden_states=context, return_dict=False)[0].clone()

        return Built(run, info={"mode": mode, "dynamic": False})


class ExportedEngine(Engine):
    """An engine from :mod:`slimdiff.export` (ONNX Runtime, TensorRT, AOTInductor) served through
    :class:`slimdiff.runtime.EngineUNet`, built the way ``slimdiff-export`` builds it: from a float32 source,
    head widths zero-padded for fused attention on CUDA and for TensorRT, one engine per model whose batch range
    covers the batches asked for."""

    kind = ""

    def unavailable(self, device):
        try:
            from ..export.engines import build_engine  # noqa: F401
            from ..runtime import EngineUNet  # noqa: F401
        except ImportError as exc:
            return f"slimdiff.export / slimdiff.runtime cannot be imported here: {exc}"
        return None

    def build(self, unet, batches, latent, text_len, workdir):
        import copy
        import json

        from ..export.align import align_head_widths, planned_head_widths
        from ..export.engines import build_engine
        from ..export.modules import component_axes, unet_component
        from ..export.onnx import export_onnx
        from ..export.shapes import Profile, Range, latent_multiple
        from ..runtime import EngineUNet

        param = next(unet.parameters())
        device, dtype = str(param.device), param.dtype
        source = unet if dtype == torch.float32 else copy.deepcopy(unet).float()
        changed = {}
        if (self.kind == "trt" or is_cuda(device)) and planned_head_widths(source):
            source = copy.deepcopy(source) if source is unet else source
            changed = align_head_widths(source)
        component = unet_component(source)
        multiple = latent_multiple(unet.config)
        multiples = {"height": multiple, "width": multiple}
        profile = Profile(Range(min(batches), max(batches), max(batches)), Range(latent[0], latent[0], latent[0]),
                          Range(latent[1], latent[1], latent[1]), Range(text_len, text_len, text_len))
        plan = getattr(unet, "slim_plan", None)
        extra = {"variant": "slim" if plan is not None else "dense", "unet_config": dict(unet.config),
                 "parameters": sum(p.numel() for p in unet.parameters()),
                 "rank_plan": json.loads(plan.to_json()) if plan is not None else None,
                 "head_alignment": {k: [list(a), list(b)] for k, (a, b) in changed.items()}}
        onnx_path, opset = None, None
        if self.kind in ("ort", "trt"):
            onnx_path, opset = Path(workdir) / "unet.onnx", self._opset()
            sidecar = export_onnx(component, [profile], onnx_path, opset=opset, dtype=dtype, multiples=multiples,
                                  parity_device=device if self._ort_cuda(device) else "cpu")
            axes = sidecar["axes"]
        else:
            axes = component_axes(component, profile, multiples)
        meta = build_engine(self.kind, component, Path(workdir), axes=axes, profiles=[profile.to_json()],
                            dtype=dtype, device=device, onnx_path=onnx_path, extra=extra)
        engine = EngineUNet.from_folder(workdir, device=device)
        del source, component
        return Built(_torch_runner(engine.forward), files=[Path(workdir) / f for f in meta["files"]],
                     info={"runtime": meta.get("runtime"), "onnx_opset": opset,
                           "head_alignment": extra["head_alignment"],
                           "load_s": engine.load_seconds})

    def _opset(self) -> int:
        from ..export.onnx import DEFAULT_OPSET

        return DEFAULT_OPSET

    @staticmethod
    def _ort_cuda(device: str) -> bool:
        import onnxruntime as ort

        return is_cuda(device) and "CUDAExecutionProvider" in ort.get_available_providers()


class OrtEngine(ExportedEngine):
    name = kind = "ort"
    description = "ONNX Runtime (opset-23 export, saved optimized graph)"

    def unavailable(self, device):
        reason = super().unavailable(device)
        if reason:
            return reason
        import onnxruntime as ort

        wanted = "CUDAExecutionProvider" if is_cuda(device) else "CPUExecutionProvider"
        if wanted not in ort.get_available_providers():
            return (f"onnxruntime {ort.__version__} here has no {wanted} "
                    f"(available: {', '.join(ort.get_available_providers())})")
        return None


class AotiEngine(ExportedEngine):
    name = kind = "aoti"
    description = "AOTInductor package (torch.export + ahead-of-time Inductor)"


class TrtEngine(ExportedEngine):
    name = kind = "trt"
    description = "TensorRT FP16 engine from the ONNX export"

    def unavailable(self, device):
        if not is_cuda(device):
            return "TensorRT needs a CUDA device; this run is on the CPU"
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed here (the tensorrt Python package cannot be imported)"
        return super().unavailable(device)

    def _opset(self) -> int:
        import tensorrt

        from ..export.trt import opset_for_tensorrt

        return opset_for_tensorrt(tensorrt.__version__)


_REGISTRY: dict[str, type[Engine]] = {}


def register(engine: type[Engine]) -> None:
    """Make an engine class available by its ``name`` (to the CLI, the harness and the GPU suite)."""
    if not engine.name:
        raise SlimDiffError("an engine needs a name")
    _REGISTRY[engine.name] = engine


def create(name: str, **options) -> Engine:
    """An engine instance; ``options`` (e.g. ``compile_mode``) are read by the engines that use them."""
    try:
        return _REGISTRY[name](**options)
    except KeyError:
        raise SlimDiffError(f"unknown engine {name!r}; known: {', '.join(_REGISTRY)}") from None


def names() -> list[str]:
    return list(_REGISTRY)


def parse_engines(text: str) -> list[str]:
    wanted = [e.strip() for e in text.split(",") if e.strip()]
    if not wanted:
        raise SlimDiffError("no engine named (e.g. --engines eager,ort)")
    unknown = [e for e in wanted if e not in _REGISTRY]
    if unknown:
        raise SlimDiffError(f"unknown engine(s) {', '.join(unknown)}; known: {', '.join(_REGISTRY)}")
    return list(dict.fromkeys(wanted))


for _engine in (EagerEngine, CudaGraphEngine, CompileEngine, OrtEngine, AotiEngine, TrtEngine):
    register(_engine)
