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
