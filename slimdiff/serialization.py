"""Save and load slim UNets as diffusers folders, and whole slim pipelines.

A slim UNet folder is what ``SlimUNet2DConditionModel.save_pretrained`` writes — ``config.json`` (class
``SlimUNet2DConditionModel``, the dense architecture plus ``rank_plan``) and safetensors — plus
``slimdiff_plan.json``, the same plan for people and tools. Folders of earlier slimdiff versions (a
``UNet2DConditionModel`` config and the plan only in ``slimdiff_plan.json``) still load.

Loading builds the architecture from ``config.json`` on the meta device, gives it the plan's shapes, then
assigns the saved tensors — so no weights are materialised twice and nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from .checks import check_output_dir, verify_weights_file
from .errors import SlimDiffError
from .plan import RankPlan
from .rebuild import apply_plan_shapes

PLAN_FILE = "slimdiff_plan.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SLIM_CLASS = "SlimUNet2DConditionModel"


def _config(path: Path) -> dict | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_slim_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / PLAN_FILE).is_file() or (_config(path) or {}).get("_class_name") == SLIM_CLASS


def atomic_output_dir(out: Path, overwrite: bool = False) -> Path:
    """A fresh temporary sibling of ``out``; pair with :func:`commit_output_dir` to publish it whole."""
    out = check_output_dir(out, overwrite)
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


def _slim_model(unet: torch.nn.Module, plan: RankPlan):
    from .slim_models import SlimUNet2DConditionModel

    if isinstance(unet, SlimUNet2DConditionModel) and unet.slim_plan.modules == plan.modules:
        return unet
    return SlimUNet2DConditionModel.from_slim(unet, plan)


def save_slim(unet: torch.nn.Module, plan: RankPlan, out: str | os.PathLike, overwrite: bool = False,
              extra_files: dict[str, str] | None = None) -> Path:
    """Write ``unet`` (already slimmed to ``plan``) to ``out`` as a ``SlimUNet2DConditionModel`` folder; the
    folder appears complete or not at all. ``extra_files`` (name → text) are written alongside, e.g. a report.
    """
    slim = _slim_model(unet, plan)
    with atomic_output(out, overwrite, extra_files) as tmp:
        slim.save_pretrained(tmp, safe_serialization=True)
        (tmp / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
    return Path(out)


def save_slim_pipeline(pipe, plan: RankPlan, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``pipe`` with its slim UNet as a diffusers pipeline folder whose ``model_index.json`` names
    ``SlimUNet2DConditionModel``: ``DiffusionPipeline.from_pretrained(out)`` loads it in any program that has
    imported the class (``from slimdiff import SlimUNet2DConditionModel``). ``pipe.unet`` is left as it was."""
    unet = pipe.unet
    slim = _slim_model(unet, plan)
    try:
        pipe.unet = slim
        with atomic_output(out, overwrite) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / "unet" / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
    finally:
        pipe.unet = unet
    return Path(out)


def load_plan(path: str | os.PathLike) -> RankPlan:
    """The rank plan of a slim UNet folder (``slimdiff_plan.json``, else the plan in its ``config.json``)."""
    path = Path(path)
    plan_file = path / PLAN_FILE
    if plan_file.is_file():
        return RankPlan.from_json(plan_file.read_text(encoding="utf-8"))
    config = _config(path) or {}
    if config.get("_class_name") == SLIM_CLASS and "rank_plan" in config:
        return RankPlan.from_dict(config["rank_plan"])
    raise SlimDiffError(f"{str(path)!r} is not a slim UNet folder (no {PLAN_FILE})")


def _meta_skeleton(config: dict, plan: RankPlan):
    """The slim UNet of ``config`` and ``plan`` on the meta device (shapes, no weights): a native slim config
    builds the slim class; an older folder's dense config gets the plan's shapes."""
    from diffusers import UNet2DConditionModel

    from .slim_models import SlimUNet2DConditionModel

    with torch.device("meta"):
        if config.get("_class_name") == SLIM_CLASS:
            return SlimUNet2DConditionModel.from_config(config)
        return apply_plan_shapes(UNet2DConditionModel.from_config(config), plan)


def load_slim(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a slim UNet folder written by :func:`save_slim` (or by an earlier slimdiff); returns a
    ``SlimUNet2DConditionModel`` in eval mode."""
    from diffusers import UNet2DConditionModel

    from .slim_models import SlimUNet2DConditionModel

    path = Path(path)
    plan = load_plan(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file() or not (path / "config.json").is_file():
        raise SlimDiffError(f"slim folder {str(path)!r} is incomplete (needs config.json and {WEIGHTS_FILE})")
    try:
        config = UNet2DConditionModel.load_config(str(path))
        native = config.get("_class_name") == SLIM_CLASS
        if native and RankPlan.from_dict(config.get("rank_plan") or {}).modules != plan.modules:
            raise SlimDiffError(f"its {PLAN_FILE} and config.json hold different rank plans")
        unet = _meta_skeleton(config, plan)
        # safetensors slices one buffer, so tensors can start unaligned and BLAS then takes another code
        # path; fresh allocations make a loaded UNet compute bit-identically to the one that was saved.
        state = {k: v.clone() for k, v in load_file(str(weights), device=str(device)).items()}
        unet.load_state_dict(state, strict=True, assign=True)
    except SlimDiffError as exc:
        raise SlimDiffError(f"corrupt slim folder {str(path)!r}: {exc}") from exc
    except Exception as exc:  # safetensors/diffusers/torch raise assorted types on damaged files
        raise SlimDiffError(f"corrupt slim folder {str(path)!r}: {exc}") from exc
    if not native:
        unet = SlimUNet2DConditionModel.from_slim(unet, plan)
    unet.slim_plan = plan  # with its provenance (slimdiff_plan.json may carry more than the config)
    if unet.dtype != dtype:
        unet = unet.to(dtype=dtype)
    return unet.eval().requires_grad_(False)


def verify_slim_folder(path: str | os.PathLike) -> None:
    """The weights of a slim UNet folder against the shapes its config and rank plan imply (no data read)."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    plan = load_plan(path)
    if not (path / "config.json").is_file():
        raise SlimDiffError(f"slim folder {str(path)!r} is incomplete (no config.json)")
    unet = _meta_skeleton(UNet2DConditionModel.load_config(str(path)), plan)  # the one load_slim fills
    verify_weights_file(path / WEIGHTS_FILE, {k: tuple(v.shape) for k, v in unet.state_dict().items()})
