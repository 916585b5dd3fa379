"""Engines the benchmark can run a denoiser on, behind one small interface.

An engine turns a denoiser (a UNet or a DiT) into a runner ``run(*inputs) -> noise prediction`` that takes the
positional inputs its model family exports (:meth:`slimdiff.families.DenoiserFamily.export_inputs`: the latent, a
float32 (batch,) timestep, the text conditioning and the family's extra conditions, torch tensors on the benchmark
device) and computes the family's :meth:`~slimdiff.families.DenoiserFamily.export_call` — the call exported graphs
trace (of the ``family`` option's family where given: the pipeline's, for a denoiser that cannot say which pipeline
it serves, FLUX Kontext's transformer). ``unavailable(device)`` says why an engine cannot run here — the harness
reports that reason instead of leaving the engine out. New engines plug in with :func:`register`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import SlimDiffError
from ..families import family_for
from .timing import cuda_graphed, is_cuda

Runner = Callable[..., torch.Tensor]


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

    def build(self, denoiser: nn.Module, batches: list[int], latent: tuple[int, int], text_len: int,
              workdir: Path) -> Built:
        """An engine for ``denoiser`` that accepts every batch size in ``batches`` at one latent size and
        ``text_len`` text tokens."""
        raise NotImplementedError

    def open(self, folder: Path, device: str) -> Built:
        """An engine built earlier into ``folder`` (by ``slimdiff-export``), without building it again."""
        raise SlimDiffError(f"{self.name} engines are not built into folders; nothing to open in {folder}")


def family_call(denoiser: nn.Module, family=None) -> Runner:
    """``run(*inputs)``: the positional call (what exported graphs compute) of ``family``, default the denoiser's."""
    call = (family or family_for(denoiser)).export_call

    def run(*inputs):
        return call(denoiser, *inputs)

    return run


class EagerEngine(Engine):
    name = "eager"
    description = "PyTorch eager (diffusers modules, SDPA attention)"

    def build(self, denoiser, batches, latent, text_len, workdir):
        return Built(family_call(denoiser, self.options.get("family")),
                     info={"attention": "scaled_dot_product_attention"})


class CudaGraphEngine(Engine):
    name = "cudagraph"
    description = "PyTorch eager replayed from a CUDA graph per input shape (no per-kernel launch cost)"

    def unavailable(self, device):
        return None if is_cuda(device) else "CUDA graphs need a CUDA device; this run is on the CPU"

    def build(self, denoiser, batches, latent, text_len, workdir):
        graphs = {}
        call = family_call(denoiser, self.options.get("family"))

        def run(*inputs):
            key = tuple(tuple(t.shape) for t in inputs)
            if key not in graphs:
                static = tuple(t.clone() for t in inputs)
                graphs[key] = static, cuda_graphed(lambda: call(*static), inputs[0].device)
            static, replay = graphs[key]
            for buffer, t in zip(static, inputs):
                buffer.copy_(t)
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

    def build(self, denoiser, batches, latent, text_len, workdir):
        cuda = is_cuda(next(denoiser.parameters()).device)
        # "reduce-overhead" on CUDA (Inductor kernels + CUDA graphs); Inductor's default on the CPU.
        # "max-autotune" (GEMM template search) is an option: it took over 6 minutes for the SD-1.5 UNet on an
        # H100 (bench/results/2026-11-22-h100), more than a GPU session's suite can spend per model.
        mode = self.options.get("compile_mode") or ("reduce-overhead" if cuda else "default")
        # Models are measured one after another and never revisited: dropping Dynamo's caches keeps each new
        # model from counting against the recompile limit of the shared denoiser forward code.
        torch._dynamo.reset()
        compiled = torch.compile(family_call(denoiser, self.options.get("family")), mode=mode, dynamic=False,
                                 fullgraph=False)
        mark_step = cuda and mode in ("max-autotune", "reduce-overhead")

        def run(*inputs):
            if not mark_step:
                return compiled(*inputs)
            # CUDA graphs replay into the same output memory: mark each call as a new step and hand out a
            # copy, since schedulers may keep a model output across calls (as the engine runtime does).
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*inputs).clone()

        return Built(run, info={"mode": mode, "dynamic": False})


class ExportedEngine(Engine):
    """An engine backend of :mod:`slimdiff.engines` (ONNX Runtime, TensorRT, AOTInductor...), built through the
    same path as ``slimdiff-export`` (:func:`slimdiff.engines.build.build_denoiser_engine`) and served through the
    engine-backed denoiser a pipeline would get (``EngineUNet``, ``EngineSD3Transformer``…): one engine per model
    whose batch range covers the batches asked for."""

    kind = ""

    def unavailable(self, device):
        from .. import engines

        return engines.get(self.kind).unavailable(device)

    def build(self, denoiser, batches, latent, text_len, workdir):
        from ..engines.build import build_denoiser_engine
        from ..export.shapes import Profile, Range, latent_multiple

        param = next(denoiser.parameters())
        device, dtype = str(param.device), param.dtype
        profile = Profile(Range(min(batches), max(batches), max(batches)), Range(latent[0], latent[0], latent[0]),
                          Range(latent[1], latent[1], latent[1]), Range(text_len, text_len, text_len))
        family = self.options.get("family")
        _, sidecar = build_denoiser_engine(denoiser, self.kind, Path(workdir), profiles=[profile], dtype=dtype,
                                          device=device, multiple=latent_multiple(denoiser.config),
                                          plan=getattr(denoiser, "slim_plan", None), family=family,
                                          export_options=tuple(family.exporting) if family is not None else ())
        return self._opened(workdir, device, onnx_opset=sidecar["opset"] if sidecar else None)

    def open(self, folder, device):
        return self._opened(folder, device, prebuilt=str(folder))

    def _opened(self, folder, device, **info) -> Built:
        """The engine in ``folder``, loaded through the runtime as a pipeline would, with its facts."""
        from ..runtime.unet import open_denoiser_engine

        engine = open_denoiser_engine(folder, device=device)
        meta = engine.meta
        if meta["engine"] != self.kind:
            raise SlimDiffError(f"{folder} holds a {meta['engine']} engine, not {self.kind}")

        def run(*inputs):  # the exported inputs, through the call a pipeline makes
            return engine.call_exported(list(inputs))

        return Built(run, files=[Path(folder) / f for f in meta["files"]],
                     info={**info, "runtime": meta.get("runtime"), "head_alignment": meta.get("head_alignment"),
                           "load_s": engine.load_seconds})


def exported_engine(kind: str) -> type[Engine]:
    """The benchmark engine for backend ``kind`` of :mod:`slimdiff.engines`."""
    from .. import engines

    return type(f"Exported_{kind}", (ExportedEngine,),
                {"name": kind, "kind": kind, "description": engines.get(kind).description})


_REGISTRY: dict[str, type[Engine]] = {}


def register(engine: type[Engine]) -> None:
    """Make an engine class available by its ``name`` (to the CLI, the harness and the GPU suite)."""
    if not engine.name:
        raise SlimDiffError("an engine needs a name")
    _REGISTRY[engine.name] = engine


def create(name: str, **options) -> Engine:
    """An engine instance; ``options`` (e.g. ``compile_mode``, ``family``) are read by the engines that use them."""
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


def _register_builtin() -> None:
    from .. import engines

    for engine in (EagerEngine, CudaGraphEngine, CompileEngine):
        register(engine)
    for kind in engines.names():  # every engine backend is benchmarkable, with no code here
        register(exported_engine(kind))


_register_builtin()
