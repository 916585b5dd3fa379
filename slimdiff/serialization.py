"""Save and load slim UNets as ordinary diffusers folders: ``config.json`` + safetensors + the rank plan.

Loading builds the original architecture from ``config.json`` on the meta device, gives it the plan's
shapes, then assigns the saved tensors — so no weights are materialised twice and nothing is unpickled.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from .errors import SlimDiffError
from .plan import RankPlan
from .rebuild import apply_plan_shapes

PLAN_FILE = "slimdiff_plan.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def is_slim_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / PLAN_FILE).is_file()


def atomic_output_dir(out: Path, overwrite: bool = False) -> Path:
    """A fresh temporary sibling of ``out``; pair with :func:`commit_output_dir` to publish it whole."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimDiffError(f"output {str(out)!r} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_output_dir(tmp: Path, out: Path) -> None:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


@contextmanager
def atomic_output(out: str | os.PathLike, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None) -> Iterator[Path]:
    """``with atomic_output(out) as tmp:`` write into ``tmp``; on success ``extra_files`` (name → text) are
    added and ``tmp`` becomes ``out`` whole, on failure nothing is left behind."""
    out = Path(out)
    tmp = atomic_output_dir(out, overwrite)
    try:
        yield tmp
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        commit_output_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_slim(unet: torch.nn.Module, plan: RankPlan, out: str | os.PathLike, overwrite: bool = False,
              extra_files: dict[str, str] | None = None) -> Path:
    """Write ``unet`` (already slimmed to ``plan``) to ``out``; the folder appears complete or not at all.

    ``extra_files`` (name → text) are written alongside, e.g. a JSON report.
    """
    with atomic_output(out, overwrite, extra_files) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
    return Path(out)


def load_plan(path: str | os.PathLike) -> RankPlan:
    plan_file = Path(path) / PLAN_FILE
    if not plan_file.is_file():
        raise SlimDiffError(f"{str(path)!r} is not a slim UNet folder (no {PLAN_FILE})")
    return RankPlan.from_json(plan_file.read_text(encoding="utf-8"))


def load_slim(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a slim UNet folder written by :func:`save_slim`; returns a ``UNet2DConditionModel`` in eval mode."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    plan = load_plan(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file() or not (path / "config.json").is_file():
        raise SlimDiffError(f"slim folder {str(path)!r} is incomplete (needs config.json and {WEIGHTS_FILE})")
    try:
        config = UNet2DConditionModel.load_config(str(path))
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        apply_plan_shapes(unet, plan)
        # safetensors slices one buffer, so tensors can start unaligned and BLAS then takes another code
        # path; fresh allocations make a loaded UNet compute bit-identically to the one that was saved.
        state = {k: v.clone() for k, v in load_file(str(weights), device=str(device)).items()}
        unet.load_state_dict(state, strict=True, assign=True)
    except SlimDiffError as exc:
        raise SlimDiffError(f"corrupt slim folder {str(path)!r}: {exc}") from exc
    except Exception as exc:  # safetensors/diffusers/torch raise assorted types on damaged files
        raise SlimDiffError(f"corrupt slim folder {str(path)!r}: {exc}") from exc
    unet.slim_plan = plan
    return unet.to(dtype=dtype).eval().requires_grad_(False)


class SlimUNet2DConditionModel:
    """``SlimUNet2DConditionModel.from_pretrained(folder)`` — the diffusers-style entry point to :func:`load_slim`."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike, torch_dtype: torch.dtype | None = None, device: str = "cpu"):
        return load_slim(path, dtype=torch_dtype or torch.float32, device=device)
