"""Which device a command runs on: one resolver shared by every command line."""

from __future__ import annotations

from .errors import SlimDiffError


def resolve_device(name: str | None) -> str:
    """``None`` means CUDA when available, else the CPU; an explicit CUDA device must exist."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SlimDiffError("--device cuda was asked for, but no CUDA device is available")
    return name


def available_memory_bytes(device: str) -> int | None:
    """Memory a new allocation can get now on ``device``: free GPU memory, or the kernel's MemAvailable for the
    host; None when this system does not say."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
