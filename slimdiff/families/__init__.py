"""Model-family adapters: the one place that knows a model's layout (see :mod:`slimdiff.families.base`).

Built-in adapters are registered on first lookup, so ``import slimdiff.families`` stays cheap. A new family
or block type is one module that registers its adapter in :data:`FAMILIES` / :data:`BLOCKS`; list it in
``_BUILTIN`` to have it loaded by default.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ..errors import SlimDiffError
from .base import (
    ATTENTION,
    BLOCKS,
    CROSS,
    MODEL_DTYPE,
    FAMILIES,
    FFN,
    QK,
    SELF,
    TEXT_CONTEXT,
    VO,
    AttentionGrams,
    AttentionStatistics,
    BlockAdapter,
    ConditionInput,
    DenoiserFamily,
    ExportInput,
    FFNEnergies,
    FFNLinears,
    FFNStatistics,
    KEEP_MASK,
    ModuleSite,
    NORMAL,
    QKLinears,
    ResidualEnergies,
    SublayerTaps,
    TextContextMoment,
    TextTower,
    TIMESTEP,
    VOLinears,
    stat_key,
)

# Modules that register the built-in adapters, in registration order (later ones win among equals).
_BUILTIN = (".blocks", ".mmdit", ".sd", ".sdxl", ".pixart", ".sd3")
_loaded = False


def load_builtin() -> None:
    global _loaded
    if not _loaded:
        for name in _BUILTIN:
            importlib.import_module(name, __name__)
        _loaded = True


def family_for(obj: Any) -> DenoiserFamily:
    """The family serving ``obj`` — a pipeline or a denoiser — or a :class:`SlimDiffError` naming what is
    supported."""
    load_builtin()
    family = FAMILIES.get(obj)
    if family is None:
        raise SlimDiffError(f"slimdiff has no model family for {_describe(obj)} "
                            f"(supported: {FAMILIES.supported()})")
    return family


def check_measures(obj: Any, command: str) -> None:
    """Refuse, in one line, a pipeline or denoiser whose family ``slimdiff bench`` / ``slimdiff eval`` do not serve
    yet (before anything is calibrated or built)."""
    family = family_for(obj)
    if not family.measures:
        raise SlimDiffError(f"{command} works on UNet pipelines (SD-1.x/2.x, SDXL) so far, not on {_describe(obj)} "
                            f"(family {family.name!r}): export its engines with `slimdiff-export` and run them in "
                            "the pipeline (slimdiff.use_engine), or run the slim model in diffusers")


def _describe(obj: Any) -> str:
    cfg = getattr(obj, "config", None)
    extra = cfg.get("addition_embed_type") if hasattr(cfg, "get") else None
    return type(obj).__name__ + (f" with addition_embed_type={extra!r}" if extra else "")


def block_adapter(block: nn.Module) -> BlockAdapter | None:
    """The adapter of a transformer block, or None when ``block`` is no registered block class."""
    load_builtin()
    return BLOCKS.get(block)


def transformer_blocks(denoiser: nn.Module) -> list[tuple[str, nn.Module, BlockAdapter]]:
    """Every transformer block of ``denoiser`` that has an adapter, in forward order, with its dotted path."""
    load_builtin()
    blocks = []
    for path, module in denoiser.named_modules():
        adapter = BLOCKS.get(module)
        if adapter is not None:
            blocks.append((path, module, adapter))
    if not blocks:
        raise SlimDiffError(f"{type(denoiser).__name__} has no transformer block slimdiff can slim "
                            f"({BLOCKS.supported()}): nothing to slim")
    return blocks


def module_sites(denoiser: nn.Module) -> list[ModuleSite]:
    """The allocation pool: every compressible site of every transformer block, in forward order."""
    family_for(denoiser)
    return [site for path, block, adapter in transformer_blocks(denoiser) for site in adapter.sites(path, block)]


def site_adapter(denoiser: nn.Module, site: ModuleSite) -> tuple[nn.Module, BlockAdapter]:
    """The block holding ``site`` and that block's adapter."""
    block = denoiser.get_submodule(site.block)
    adapter = block_adapter(block)
    if adapter is None:
        raise SlimDiffError(f"{site.block}: {type(block).__name__} is not a transformer block slimdiff knows")
    return block, adapter


def site_linears(denoiser: nn.Module, site: ModuleSite):
    block, adapter = site_adapter(denoiser, site)
    return adapter.linears(block, site)


__all__ = [
    "ATTENTION", "BLOCKS", "CROSS", "FAMILIES", "FFN", "MODEL_DTYPE", "QK", "SELF", "TEXT_CONTEXT", "VO", "AttentionGrams", "AttentionStatistics",
    "BlockAdapter", "ConditionInput", "DenoiserFamily", "ExportInput", "KEEP_MASK", "NORMAL", "TIMESTEP", "FFNEnergies", "FFNLinears", "FFNStatistics", "ModuleSite", "QKLinears", "ResidualEnergies",
    "SublayerTaps", "TextContextMoment", "TextTower", "VOLinears", "block_adapter", "family_for", "load_builtin", "module_sites",
    "check_measures", "site_adapter", "site_linears", "stat_key", "transformer_blocks",
]
