"""What a model folder holds on disk: which weight variant to load, and the dtype its denoiser was stored in.

Pipeline folders as downloaded from a hub often carry only variant files (``diffusion_pytorch_model.fp16.
safetensors``, ``model.fp16.safetensors``); diffusers loads them only when asked for the variant by name. Large
denoisers come in shards behind an index file. A folder
with exactly one variant and no plain files is loaded as that variant without being asked. The dtype the
denoiser (``unet/``, or ``transformer/`` for PixArt, SD3 and FLUX) was stored in is what a slim denoiser is saved in by
default, so an fp16 model does not come back twice its size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import SlimDiffError

UNET_WEIGHTS = "diffusion_pytorch_model"
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def denoiser_folder(folder: Path) -> str:
    """The subfolder of a pipeline folder that holds its denoiser: ``transformer`` when ``model_index.json``
    names one (PixArt, SD3, FLUX), else ``unet`` (an unreadable index is reported by the loader, not here)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "unet"
    return "transformer" if isinstance(index, dict) and "transformer" in index else "unet"


# diffusers' names for a denoiser's weights: one file, or shards listed by an index (what `save_pretrained` writes
# above its 10 GB shard size — FLUX.1-dev's and SD3.5-large's transformers, an SDXL UNet saved in float32), each
# with an optional variant: ``diffusion_pytorch_model[.fp16].safetensors``, ``diffusion_pytorch_model.safetensors.
# index[.fp16].json`` over ``diffusion_pytorch_model[.fp16]-00001-of-00003.safetensors``.
_VARIANT_FILE = re.compile(rf"{UNET_WEIGHTS}\.(\w+)\.safetensors$")
_VARIANT_INDEX = re.compile(rf"{UNET_WEIGHTS}\.safetensors\.index\.(\w+)\.json$")


def _weights_name(variant: str | None) -> str:
    return f"{UNET_WEIGHTS}.{variant}.safetensors" if variant else f"{UNET_WEIGHTS}.safetensors"


def _index_name(variant: str | None) -> str:
    return f"{UNET_WEIGHTS}.safetensors.index.{variant}.json" if variant else f"{UNET_WEIGHTS}.safetensors.index.json"


def denoiser_weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The files that hold a pipeline folder's denoiser weights of ``variant`` (``None``: the plain ones): the
    single file, or the shards its index lists; empty when there are neither."""
    denoiser = folder / denoiser_folder(folder)
    single = denoiser / _weights_name(variant)
    if single.is_file():
        return [single]
    try:
        index = json.loads((denoiser / _index_name(variant)).read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no index, or none diffusers could read
        return []
    return [denoiser / shard for shard in shards]


def available_variants(folder: Path) -> list[str]:
    """Variant names of the denoiser's safetensors files in a pipeline folder (``fp16``, ``bf16``...), single or
    sharded."""
    names = [p.name for p in (folder / denoiser_folder(folder)).glob(f"{UNET_WEIGHTS}.*")]
    return sorted({m[1] for name in names if (m := _VARIANT_FILE.match(name) or _VARIANT_INDEX.match(name))})


def choose_variant(folder: str | Path, requested: str | None) -> str | None:
    """The variant to load from a pipeline folder: ``requested`` if its files exist, else the only one present
    when there are no plain weight files, else ``None`` (the plain files)."""
    folder = Path(folder)
    denoiser = denoiser_folder(folder)
    variants = available_variants(folder)
    if requested is not None:
        if requested not in variants:
            have = ", ".join(variants) or "none"
            raise SlimDiffError(f"--variant {requested}: {str(folder)!r} has no {denoiser}/{UNET_WEIGHTS}."
                                f"{requested}.safetensors (variants present: {have})")
        return requested
    if denoiser_weight_files(folder, None):
        return None
    if len(variants) == 1:
        return variants[0]
    if variants:
        raise SlimDiffError(f"{str(folder)!r} has only variant weight files ({', '.join(variants)}): "
                            "choose one with --variant")
    pickles = sorted(p.name for p in (folder / denoiser).glob("*.bin"))
    found = f" (found {', '.join(pickles)}: pickle files are not loaded)" if pickles else ""
    raise SlimDiffError(f"{str(folder)!r} has no {denoiser}/{UNET_WEIGHTS}.safetensors{found}")


_PICKLES = ("*.bin", "*.ckpt", "*.pt", "*.pth")
#: Components slimdiff never loads (models.py passes None for them), so their files do not matter.
_NOT_LOADED = ("safety_checker", "feature_extractor")


def refuse_pickled_components(folder: Path) -> None:
    """One line naming a component of a pipeline folder whose weights exist only as pickles (``pytorch_model.bin``,
    as older hub folders ship text encoders): they are never unpickled, and diffusers would say only that a
    safetensors file is missing."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the loader reports an unreadable index
    for name, entry in sorted(index.items()) if isinstance(index, dict) else ():
        component = folder / name
        if name.startswith("_") or name in _NOT_LOADED or not isinstance(entry, list) or not component.is_dir():
            continue
        pickles = sorted(p.name for pattern in _PICKLES for p in component.glob(pattern))
        if pickles and not any(component.glob("*.safetensors")):
            raise SlimDiffError(f"{str(folder)!r}: {name}/ holds its weights only as pickles ({', '.join(pickles)}), "
                                "which are not loaded (unpickling can run code): convert them to safetensors")


def stored_dtype(weights: str | Path, prefix: str = "") -> torch.dtype | None:
    """The floating-point dtype of the first tensor under ``prefix`` in a safetensors file (header only)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        for name in handle.keys():
            if name.startswith(prefix):
                dtype = _SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype())
                if dtype is not None:
                    return dtype
    return None


def source_unet_dtype(source: str, variant: str | None = None) -> torch.dtype:
    """The dtype a model source stores its denoiser in (built-ins: float32)."""
    from .serialization import WEIGHTS_FILE, is_slim_folder

    path = Path(source)
    if source.startswith("builtin:") or not path.exists():
        return torch.float32
    if path.is_file():
        found = stored_dtype(path, "model.diffusion_model.")
    elif is_slim_folder(path):
        found = stored_dtype(path / WEIGHTS_FILE)
    else:
        files = denoiser_weight_files(path, choose_variant(path, variant))
        found = stored_dtype(files[0]) if files else None
    return found or torch.float32
