"""Which device a command runs on: one resolver shared by every command line."""

from __future__ import annotations

from .errors import SlimDiffError


def resolve_device(name: str | None) -> str:
    """``None`` means CUDA when available, else the CPU. An explicit device must be the CPU or a CUDA device this
    machine has: calibration keeps float64 moments, and the engines run on CUDA or the CPU, so no other torch
    device (``mps``, ``xpu``) would get through a command."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SlimDiffError(f"--device {name!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SlimDiffError(f"--device {name} was asked for, but no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SlimDiffError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise SlimDiffError(f"--device {name}: slimdiff runs on cpu or cuda (calibration keeps float64 moments, "
                            "and the engines run on CUDA or the CPU)")
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
