"""AOTInductor backend: ``torch.export`` with dynamic batch / latent size / tokens, compiled ahead of time
with ``torch._inductor.aoti_compile_and_package`` into one ``.pt2`` file.

The package holds compiled kernels and weights; :func:`load_aoti_package` runs it through
``torch._inductor.aoti_load_package`` without diffusers or any slimdiff model code. A package is tied to the
torch build that compiled it (and, on CUDA, to the GPU architecture), which its metadata records and checks.

New weights go into the loaded package in place (:meth:`AotiRunner.update_weights`: the package's
``load_constants`` on its constants, named as the exported module's state dict). Inductor folds some parameters into
constants of its own when it compiles (a convolution's bias); the engine records those as fixed.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from ..errors import SlimDiffError
from ..export.meta import status
from ..export.modules import Component, example_values, torch_dynamic_shapes
from .base import Backend, register
from .weights import NOT_A_WEIGHT, checked_state, load_weights_record


def device_info(device: str) -> dict:
    info = {"torch_version": torch.__version__, "device": str(device).split(":")[0]}
    if info["device"] == "cuda":
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        info.update(gpu_name=torch.cuda.get_device_name(index), compute_capability=f"{major}.{minor}")
    return info


def build_aoti_engine(component: Component, axes: dict[str, dict], package_path: Path, *,
                      device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Compile ``component`` for ``device``/``dtype`` over the dynamic ``axes``; returns runtime metadata."""
    package_path = Path(package_path)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SlimDiffError("AOTInductor for cuda needs a CUDA build of torch and a GPU; use --device cpu")
    module = component.module
    if next(module.parameters()).dtype != dtype or next(module.parameters()).device != torch.device(device):
        module = copy.deepcopy(module).to(device=device, dtype=dtype)
    example = component.random_inputs(example_values(axes), dtype, seed=0, device=device)
    tmp = package_path.with_name(f".{package_path.stem}.tmp{os.getpid()}.pt2")  # inductor wants *.pt2
    status(f"compiling {component.name} with AOTInductor for {device} (minutes on a small CPU)")
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(module, tuple(example), dynamic_shapes=torch_dynamic_shapes(component, axes))
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        os.replace(tmp, package_path)
    except Exception as exc:  # export/inductor raise many types; one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimDiffError(f"AOTInductor compilation of {component.name} failed: {first}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    status(f"{component.name}: AOTInductor package {package_path.stat().st_size / 2**20:.1f} MiB in {seconds:.0f} s")
    return {**device_info(device), "compile_seconds": round(seconds, 1), "files": [package_path.name]}


def check_aoti_environment(recorded: dict, current: dict, path: Path) -> None:
    keys = ["torch_version", "device"] + (["compute_capability"] if recorded.get("device") == "cuda" else [])
    bad = [f"{k} {recorded.get(k)!r} (here: {current.get(k)!r})" for k in keys if recorded.get(k) != current.get(k)]
    if bad:
        raise SlimDiffError(f"AOTInductor package {str(path)!r} was compiled for {', '.join(bad)}; "
                            "compile it again here with slimdiff-export")


def load_aoti_package(path: Path, runtime_meta: dict, device: str):
    """The compiled callable: ``fn(*inputs) -> output``."""
    path = Path(path)
    if not path.is_file():
        raise SlimDiffError(f"AOTInductor package {str(path)!r} is missing")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SlimDiffError(f"AOTInductor package {str(path)!r} needs CUDA, which this torch build lacks")
    check_aoti_environment(runtime_meta, device_info(device), path)
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as exc:  # a damaged zip or .so surfaces as assorted errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimDiffError(f"AOTInductor package {str(path)!r} is corrupt: {first}") from exc


class AotiRunner:
    """An AOTInductor package. Its outputs come from PyTorch's caching allocator, which already recycles
    device memory between calls, so no buffers are kept here."""

    def __init__(self, meta: dict, folder: Path, device: str):
        self.device = torch.device(device)
        self.dtype = getattr(torch, meta["dtype"])
        self.meta, self.folder = meta, Path(folder)
        self.fn = load_aoti_package(self.folder / meta["file"], meta["runtime"], device)

    def update_weights(self, state: dict[str, torch.Tensor]) -> None:
        """The package's constants replaced by ``state``'s values (copied: the caller's tensors stay its own)."""
        arrays = checked_state(load_weights_record(self.meta, self.folder), state, self.dtype)
        constants = {name: torch.from_numpy(arrays[name]).to(self.device) for name in self.fn.get_constant_fqns()
                     if name in arrays}
        self.fn.load_constants(constants, check_full_update=False)

    def run(self, inputs: list[torch.Tensor], out_shape: tuple) -> torch.Tensor:
        out = self.fn(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out


@register
class AotiBackend(Backend):
    name = "aoti"
    description = "AOTInductor package (torch.export + ahead-of-time Inductor)"
    file_pattern = "{name}.pt2"
    from_onnx = False
    updates_weights = True

    def weight_record(self, target, onnx_path, tensors):
        # The compiled package's constants: what it takes new values of; the rest was folded in at compile time
        names = set(torch._inductor.aoti_load_package(str(target)).get_constant_fqns())
        return None, {name: NOT_A_WEIGHT for name in tensors if name not in names}

    def unavailable(self, device):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            return "AOTInductor for cuda needs a CUDA build of torch and a GPU; use --device cpu"
        return None

    def build(self, component, target, *, onnx_path, sidecar, axes, dtype, device, options):
        return build_aoti_engine(component, axes, target, device=device, dtype=dtype)

    def open(self, meta, folder, device, **options):
        return AotiRunner(meta, folder, device)
