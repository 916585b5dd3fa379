"""Where a benchmark ran: machine, accelerator and its clocks, library versions, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript",
             "onnxslim", "tensorrt", "numpy", "triton", "safetensors")


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    out["cuda_runtime"] = torch.version.cuda
    return out


def git_commit() -> dict:
    """Commit of the checkout that holds this package, and whether the package's or the benchmark scripts' files
    differ from it."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # Dirty when the package's code or a benchmark script (untracked files included) differs from the commit: a
    # device machine's copy can hold a newer working tree than its .git's HEAD, and a report must not name code
    # it did not run.
    status = git("status", "--porcelain", "--", "slimdiff", ":(glob)bench/*.py")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_clocks(index: int = 0) -> dict | None:
    """Current and maximum SM/memory clocks (MHz), temperature and power, read through NVML; None without it."""
    try:
        import pynvml
    except ImportError:
        return _smi_clocks(index)
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        out = {
            "sm_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "sm_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "source": "nvml",
        }
        pynvml.nvmlShutdown()
        return out
    except Exception:  # NVML is optional (containers without it): fall back to nvidia-smi
        return _smi_clocks(index)


def _smi_clocks(index: int) -> dict | None:
    fields = "clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw"
    try:
        done = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={fields}",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    values = [v.strip() for v in done.stdout.strip().split(",")]
    keys = ("sm_mhz", "mem_mhz", "sm_max_mhz", "mem_max_mhz", "temperature_c", "power_w")

    def num(v: str):
        try:
            return float(v)
        except ValueError:
            return None

    return {**{k: num(v) for k, v in zip(keys, values)}, "source": "nvidia-smi"}


def device_info(device: str | torch.device) -> dict:
    dev = torch.device(device)
    info = {"type": dev.type, "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(name=props.name, memory_bytes=int(props.total_memory),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    clocks=gpu_clocks(index))
    else:
        info.update(name=_cpu_model())
    return info


def machine_info() -> dict:
    # The load average tells how much a CPU timing was shared with other work (shared dev machines, CI).
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "memory_bytes": _memory_bytes(), "load_average_1_5_15m": load,
            "cuda_available": torch.cuda.is_available(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def weights_kind(model: str) -> str:
    """'seeded-random' for the shape-only built-ins, 'trained-proxy' for the project's own trained proxy model,
    'real' for loaded checkpoints."""
    if model == "builtin:proxy":
        return "trained-proxy"
    return "seeded-random" if model.startswith("builtin:") else "real"
