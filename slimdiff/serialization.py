"""Save and load slim denoisers as diffusers folders, and whole slim pipelines.

A slim denoiser folder is what a slim model class's ``save_pretrained`` writes — ``config.json`` (class
``SlimUNet2DConditionModel`` or ``SlimPixArtTransformer2DModel``, the dense architecture plus ``rank_plan``) and
safetensors — plus ``slimdiff_plan.json``, the same plan for people and tools. The folder's ``_class_name``
picks the slim class (:data:`slimdiff.slim_models.SLIM_CLASSES`). UNet folders of earlier slimdiff versions (a
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
from .lora_maps import read_maps
from .plan import RankPlan
from .rebuild import apply_plan_shapes

PLAN_FILE = "slimdiff_plan.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _config(path: Path, name: str = "config.json") -> dict | None:
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _slim_classes() -> dict[str, type]:
    from .slim_models import SLIM_CLASSES

    return SLIM_CLASSES


def is_slim_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / PLAN_FILE).is_file() or (_config(path) or {}).get("_class_name") in _slim_classes()


def _slim_pipeline_component(path: str | os.PathLike) -> str | None:
    """The component of a slim pipeline folder (:func:`save_slim_pipeline`, ``slimdiff slim --save-pipeline``)
    whose class is a slim one, read from its ``model_index.json`` (no weight is loaded); None for any other path."""
    index = _config(Path(path), "model_index.json")
    slim = [name for name, entry in (index or {}).items()
            if isinstance(entry, list) and len(entry) == 2 and entry[1] in _slim_classes()]
    return slim[0] if slim else None


def slim_denoiser_folder(source: str | os.PathLike) -> Path | None:
    """The slim denoiser folder a model source holds: itself (``slimdiff slim``'s output), or the slim component of
    a slim pipeline folder (``--save-pipeline``); None for a built-in name or a dense model. Reads no weight."""
    if str(source).startswith("builtin:"):
        return None
    if is_slim_folder(source):
        return Path(source)
    component = _slim_pipeline_component(source)
    return Path(source) / component if component else None


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


def _slim_model(model: torch.nn.Module, plan: RankPlan):
    from .slim_models import slim_class_for

    slim_cls = slim_class_for(model)
    if isinstance(model, slim_cls) and model.slim_plan.modules == plan.modules:
        return model
    return slim_cls.from_slim(model, plan)


def save_slim(model: torch.nn.Module, plan: RankPlan, out: str | os.PathLike, overwrite: bool = False,
              extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (a denoiser already slimmed to ``plan``) to ``out`` as a folder of its slim class
    (``SlimUNet2DConditionModel``, ``SlimPixArtTransformer2DModel``); the folder appears complete or not at all.
    ``extra_files`` (name → text) are written alongside, e.g. a report.
    """
    slim = _slim_model(model, plan)
    with atomic_output(out, overwrite, extra_files) as tmp:
        slim.save_pretrained(tmp, safe_serialization=True)
        (tmp / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
    return Path(out)


def save_slim_pipeline(pipe, plan: RankPlan, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``pipe`` with its slim denoiser as a diffusers pipeline folder whose ``model_index.json`` names the
    slim class: ``DiffusionPipeline.from_pretrained(out)`` loads it in any program that has imported the class
    (``from slimdiff import SlimPixArtTransformer2DModel``: importing any slim class imports them all). ``pipe``'s
    denoiser is left as it was."""
    from .families import family_for

    name = family_for(pipe).component
    model = getattr(pipe, name)
    slim = _slim_model(model, plan)
    try:
        setattr(pipe, name, slim)
        with atomic_output(out, overwrite) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / name / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
    finally:
        setattr(pipe, name, model)
    return Path(out)


def load_plan(path: str | os.PathLike) -> RankPlan:
    """The rank plan of a slim denoiser folder (``slimdiff_plan.json``, else the plan in its ``config.json``)."""
    path = Path(path)
    plan_file = path / PLAN_FILE
    if plan_file.is_file():
        return RankPlan.from_json(plan_file.read_text(encoding="utf-8"))
    config = _config(path) or {}
    if config.get("_class_name") in _slim_classes() and "rank_plan" in config:
        return RankPlan.from_dict(config["rank_plan"])
    raise SlimDiffError(f"{str(path)!r} is not a slim model folder (no {PLAN_FILE})")


def _slim_class_of(path: Path) -> tuple[type, bool]:
    """The slim class that loads the folder, and whether its config is that class's own (``False``: an earlier
    slimdiff's dense config, whose dense class's slim class loads it)."""
    cls_name = (_config(path) or {}).get("_class_name")
    for slim_cls in _slim_classes().values():
        if cls_name == slim_cls.__name__:
            return slim_cls, True
        if cls_name == slim_cls.dense_class.__name__:
            return slim_cls, False
    raise SlimDiffError(f"{str(path)!r}: config.json names {cls_name!r}, which is no model class slimdiff slims")


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (shapes only: the weights file fills them) and
    their buffers real: non-persistent buffers, such as PixArt's sin-cos position table, are computed at
    construction and are not in the weights file."""

    def to_meta(module, name, param):
        return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def _meta_skeleton(slim_cls: type, native: bool, config: dict, plan: RankPlan):
    """The slim model of ``config`` and ``plan`` with its parameters on the meta device (shapes, no weights): a
    native slim config builds the slim class; an older folder's dense config gets the plan's shapes."""
    with _parameters_on_meta():
        if native:
            return slim_cls.from_config(config)
        return apply_plan_shapes(slim_cls.dense_class.from_config(config), plan)


def _folder_config(path: Path, plan: RankPlan) -> tuple[type, bool, dict]:
    slim_cls, native = _slim_class_of(path)
    config = slim_cls.load_config(str(path))
    if native and RankPlan.from_dict(config.get("rank_plan") or {}).modules != plan.modules:
        raise SlimDiffError(f"its {PLAN_FILE} and config.json hold different rank plans")
    return slim_cls, native, config


def load_slim(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a slim denoiser folder written by :func:`save_slim` (or by an earlier slimdiff); returns its slim
    model class (``SlimUNet2DConditionModel``, ``SlimPixArtTransformer2DModel``) in eval mode."""
    path = Path(path)
    plan = load_plan(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file() or not (path / "config.json").is_file():
        raise SlimDiffError(f"slim folder {str(path)!r} is incomplete (needs config.json and {WEIGHTS_FILE})")
    try:
        slim_cls, native, config = _folder_config(path, plan)
        model = _meta_skeleton(slim_cls, native, config, plan)
        # safetensors slices one buffer, so tensors can start unaligned and BLAS then takes another code
        # path; fresh allocations make a loaded model compute bit-identically to the one that was saved.
        state = {k: v.clone() for k, v in load_file(str(weights), device=str(device)).items()}
        model.load_state_dict(state, strict=True, assign=True)
        model = model.to(device)  # the buffers built with the skeleton
    except SlimDiffError as exc:
        raise SlimDiffError(f"corrupt slim folder {str(path)!r}: {exc}") from exc
    except Exception as exc:  # safetensors/diffusers/torch raise assorted types on damaged files
        raise SlimDiffError(f"corrupt slim folder {str(path)!r}: {exc}") from exc
    if not native:
        model = slim_cls.from_slim(model, plan)
    model.slim_plan = plan  # with its provenance (slimdiff_plan.json may carry more than the config)
    model.slim_lora_maps = read_maps(path)
    if model.dtype != dtype:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def verify_slim_folder(path: str | os.PathLike) -> None:
    """The weights of a slim denoiser folder against the shapes its config and rank plan imply (no data read)."""
    path = Path(path)
    plan = load_plan(path)
    if not (path / "config.json").is_file():
        raise SlimDiffError(f"slim folder {str(path)!r} is incomplete (no config.json)")
    model = _meta_skeleton(*_folder_config(path, plan), plan)  # the one load_slim fills
    verify_weights_file(path / WEIGHTS_FILE, {k: tuple(v.shape) for k, v in model.state_dict().items()})
