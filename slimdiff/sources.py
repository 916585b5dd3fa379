"""What a model folder holds on disk: which weight variant to load, and the dtype its denoiser was stored in.

Pipeline folders as downloaded from a hub often carry only variant files (``diffusion_pytorch_model.fp16.
safetensors``, ``model.fp16.safetensors``); diffusers loads them only when asked for the variant by name. A folder
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


def available_variants(folder: Path) -> list[str]:
    """Variant names of the denoiser's safetensors files in a pipeline folder (``fp16``, ``bf16``...)."""
    pattern = re.compile(rf"{UNET_WEIGHTS}\.([\w-]+)\.safetensors$")
    return sorted({m[1] for p in (folder / denoiser_folder(folder)).glob(f"{UNET_WEIGHTS}.*.safetensors")
                   if (m := pattern.match(p.name))})


def choose_variant(folder: str | Path, requested: str | None) -> str | None:
    """The variant to load from a pipeline folder: ``requested`` if its files exist, else the only one present
    when there are no plain weight files, else ``None`` (the plain files)."""
    folder = Path(folder)
    denoiser = denoiser_folder(folder)
    variants = available_variants(folder)
    plain = (folder / denoiser / f"{UNET_WEIGHTS}.safetensors").is_file()
    if requested is not None:
        if requested not in variants:
            have = ", ".join(variants) or "none"
            raise SlimDiffError(f"--variant {requested}: {str(folder)!r} has no {denoiser}/{UNET_WEIGHTS}."
                                f"{requested}.safetensors (variants present: {have})")
        return requested
    if plain:
        return None
    if len(variants) == 1:
        return variants[0]
    if variants:
        raise SlimDiffError(f"{str(folder)!r} has only variant weight files ({', '.join(variants)}): "
                            "choose one with --variant")
    pickles = sorted(p.name for p in (folder / denoiser).glob("*.bin"))
    found = f" (found {', '.join(pickles)}: pickle files are not loaded)" if pickles else ""
    raise SlimDiffError(f"{str(folder)!r} has no {denoiser}/{UNET_WEIGHTS}.safetensors{found}")


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
        chosen = choose_variant(path, variant)
        weights = f"{UNET_WEIGHTS}.{chosen}.safetensors" if chosen else f"{UNET_WEIGHTS}.safetensors"
        found = stored_dtype(path / denoiser_folder(path) / weights)
    return found or torch.float32
