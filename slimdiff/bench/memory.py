"""Will a benchmark fit in memory? The dense UNet and its slim copies, sized on the meta device before loading.

A benchmark keeps the dense UNet and one slim copy per budget in memory at once (each slim model is timed
interleaved with the dense one). At SDXL size in fp32 that is 10.3 GB for the dense UNet and 5–7 GB per slim
copy: on a machine that cannot hold them the run would be killed minutes into loading, with no message. The
check below counts only those weights — a lower bound (text encoders, VAE and activations come on top) — so it
never refuses a run that could fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..devices import available_memory_bytes
from ..errors import SlimDiffError


def unet_config(source: str) -> dict | None:
    """The denoiser config (a UNet's, or a DiT's with its ``_class_name``) of a built-in model or a diffusers
    folder, read without loading any weights; None for sources whose config is only known after loading
    (single-file checkpoints)."""
    from ..models import BUILTIN_DENOISER_CONFIGS

    if source in BUILTIN_DENOISER_CONFIGS:
        return dict(BUILTIN_DENOISER_CONFIGS[source])
    folder = Path(source)
    for candidate in (folder / "unet" / "config.json", folder / "transformer" / "config.json", folder / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise SlimDiffError(f"{candidate}: not valid JSON ({exc})") from exc
    return None


def pipeline_family(source: str, config: dict):
    """The family whose pipeline calls the denoiser of ``source`` (a built-in or a diffusers folder), read without
    loading: the pipeline's, where ``model_index.json`` (or the built-in) names one the denoiser fits — FLUX Kontext's
    transformer has FLUX.1-dev's configuration, and only its pipeline adds the reference image's tokens — or, for a
    slim denoiser folder, the family its plan records; else the denoiser's own."""
    from ..families import FAMILIES, family_for, family_named
    from ..models import FLUX_KONTEXT_BUILTINS
    from ..serialization import is_slim_folder, load_plan
    from .macs import meta_unet

    if not source.startswith("builtin:") and is_slim_folder(source):
        recorded = load_plan(source).info.get("family")
        if recorded:
            return family_named(recorded)
    denoiser = meta_unet(config)
    index = Path(source) / "model_index.json"
    if source in FLUX_KONTEXT_BUILTINS:
        pipeline = "FluxKontextPipeline"
    elif index.is_file():
        try:
            pipeline = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError as exc:
            raise SlimDiffError(f"{index}: not valid JSON ({exc})") from exc
    else:
        pipeline = None
    for cls, names in FAMILIES.registered().items():
        if cls.__name__ == pipeline:
            for name in reversed(names):  # the latest registered wins, as for a loaded pipeline
                family = family_named(name)
                if family.accepts(denoiser):
                    return family
    return family_for(denoiser)


def latent_size(source: str, config: dict, resolution: int | None) -> tuple[int, int]:
    """The latent a UNet call sees at ``resolution`` pixels (None: the size its pipeline samples at by default, the
    family's :meth:`~slimdiff.families.DenoiserFamily.sample_size`)."""
    if resolution is None:
        from ..families import family_for
        from .macs import meta_unet

        return family_for(meta_unet(config)).sample_size(config)
    factor = 2 if source.startswith("builtin:tiny") else 8  # the tiny VAEs downsample by 2
    return resolution // factor, resolution // factor


def unet_params(config: dict, budgets: list[float], unit: str, latent: tuple[int, int], text_len: int | None = None, *,
                align: int = 8, r_min: int = 8) -> list[int]:
    """Parameters of the dense UNet (budget 0) and of the synthetic slim plan at every other budget — what
    calibrated plans of the same budget hold too, up to the allocator's rounding."""
    from .macs import meta_unet
    from .plans import synthetic_plan, transformer_mac_plan

    dense = meta_unet(config)
    total = sum(p.numel() for p in dense.parameters())
    counts = []
    for budget in budgets:
        if budget <= 0:
            counts.append(total)
            continue
        plan = (transformer_mac_plan(dense, budget, latent, text_len, align=align, r_min=r_min) if unit == "macs"
                else synthetic_plan(dense, budget, align=align, r_min=r_min))
        counts.append(total - plan.params_removed)
    return counts


def check_fits(source: str, budgets: list[float], unit: str, resolution: int | None, device: str,
               dtype: torch.dtype, *, align: int = 8, r_min: int = 8) -> None:
    """Refuse, before anything loads, a benchmark whose dense and slim UNet weights alone exceed the memory
    available on ``device``."""
    from ..serialization import is_slim_folder

    if not source.startswith("builtin:") and is_slim_folder(source):
        return
    config = unet_config(source)
    available = available_memory_bytes(device)
    if config is None or available is None:  # no config: the latent is known only after loading
        return
    latent = latent_size(source, config, resolution)
    if 0.0 not in budgets:
        budgets = [0.0, *budgets]  # slim models are timed against the dense one: it is always loaded
    size = torch.empty((), dtype=dtype).element_size()
    sizes = [n * size for n in unet_params(config, budgets, unit, latent, align=align, r_min=r_min)]
    need = sum(sizes)
    if need > available:
        where = "GPU" if torch.device(device).type == "cuda" else "host"
        copies = " + ".join(f"{s / 1e9:.1f}" for s in sizes[1:])
        raise SlimDiffError(
            f"{source} needs at least {need / 1e9:.1f} GB of {where} memory for the dense UNet "
            f"({sizes[0] / 1e9:.1f} GB, {str(dtype).removeprefix('torch.')}) and its {len(sizes) - 1} slim copies "
            f"({copies} GB), held at once; {available / 1e9:.1f} GB are available — time fewer --budgets per run "
            f"(each run times its slim models against its own dense copy) or use a smaller --dtype")
