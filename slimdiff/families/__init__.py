"""Model-family adapters: the one place that knows a model's layout (see :mod:`slimdiff.families.base`).

Built-in adapters are registered on first lookup, so ``import slimdiff.families`` stays cheap. A new family
or block type is one module that registers its adapter in :data:`FAMILIES` / :data:`BLOCKS`; list it in
``_BUILTIN`` to have it loaded by default.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from .. import fingerprint
from ..errors import SlimDiffError
from .base import (
    ATTENTION,
    BLOCKS,
    CONTROLNETS,
    CROSS,
    MODEL_DTYPE,
    FAMILIES,
    FFN,
    QK,
    SELF,
    ServedTextEncoder,
    TEXT_CONTEXT,
    TEXT_EMBEDS,
    VO,
    AttentionGrams,
    AttentionStatistics,
    BlockAdapter,
    ConditionInput,
    ControlNetAdapter,
    DenoiserFamily,
    ExportInput,
    FFNEnergies,
    FFNLinears,
    FFNStatistics,
    KEEP_MASK,
    LAST_HIDDEN_STATE,
    ModuleSite,
    NORMAL,
    PENULTIMATE_HIDDEN_STATE,
    POOLER_OUTPUT,
    QKLinears,
    ColumnBlock,
    Registry,
    ResidualEnergies,
    SIGMA,
    SublayerTaps,
    TextContextMoment,
    TextTower,
    TIMESTEP,
    VOLinears,
    column_blocks,
    image_generators,
    parse_column_block_key,
    starting_latents,
    stat_key,
)

# Modules that register the built-in adapters, in registration order (later ones win among equals).
_BUILTIN = (".blocks", ".mmdit", ".flux_blocks", ".sd", ".sdxl", ".inpaint", ".refiner", ".pixart", ".sd3", ".flux",
            ".flux_fill", ".flux_control", ".flux_kontext", ".flux_controlnet")
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
    return _registered(FAMILIES, obj, f"slimdiff has no model family for {_describe(obj)}")


def family_named(name: str) -> DenoiserFamily:
    """The registered family called ``name`` (:attr:`DenoiserFamily.name`, as plans and engines record it): what
    decides for a denoiser that cannot say which pipeline it serves (FLUX Kontext's transformer has FLUX.1-dev's
    configuration)."""
    load_builtin()
    for family in FAMILIES.adapters():
        if family.name == name:
            return family
    raise SlimDiffError(f"no model family named {name!r} (known: "
                        f"{', '.join(sorted({f.name for f in FAMILIES.adapters()}))})")


def controlnet_adapter(controlnet: Any) -> ControlNetAdapter:
    """The adapter of ``controlnet``'s kind, or a :class:`SlimDiffError` naming the kinds slimdiff knows."""
    return _registered(CONTROLNETS, controlnet, f"slimdiff does not know {type(controlnet).__name__} ControlNets")


def _registered(registry: Registry, obj: Any, missing: str):
    """``registry``'s adapter for ``obj``; ``missing``, then what the registry supports, as one line without one."""
    load_builtin()
    adapter = registry.get(obj)
    if adapter is None:
        raise SlimDiffError(f"{missing} (supported: {registry.supported()})")
    return adapter


def controlnet_classes() -> dict[str, type]:
    """The diffusers ControlNet classes slimdiff knows, by name (as a ``config.json``'s ``_class_name`` says)."""
    load_builtin()
    return {cls.__name__: cls for cls in sorted(CONTROLNETS.registered(), key=lambda c: c.__name__)}


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


def site_weights_fingerprint(denoiser: nn.Module) -> str:
    """Stable sha256 of ``denoiser``'s architecture and of every weight its sites' sub-layers hold — what statistics
    describe and slimming reads (statistics are model-specific); the same in every process
    (:mod:`slimdiff.fingerprint`)."""
    names = set()
    for site in module_sites(denoiser):
        names.update(n for n, _ in denoiser.named_parameters() if n.startswith(site.sublayer_path + "."))
    return fingerprint.model_fingerprint(denoiser, names)


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


def assemble_column_blocks(denoiser: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (slim weights by key) with the new columns of each shared Linear's blocks
    (:func:`~slimdiff.families.base.column_block_key` entries) written into that Linear's whole weight: the blocks
    given, and the Linear's current columns for the others (a site kept at full width). The Linear must already
    have its blocks' widths (the plan's shapes applied, or no block resized)."""
    given: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, value in tensors.items():
        parsed = parse_column_block_key(key)
        if parsed is None:
            out[key] = value
        else:
            given.setdefault(parsed[0], {})[parsed[1]] = value
    if not given:
        return out
    blocks = transformer_blocks(denoiser)
    for path, parts in given.items():
        owner = next(((p, b, a) for p, b, a in blocks if path.startswith(p + ".")), None)
        widths = None if owner is None else owner[2].column_blocks(owner[1]).get(path[len(owner[0]) + 1:])
        if widths is None:
            raise SlimDiffError(f"slim weights give column blocks of {path}, which no block shares by columns")
        linear = denoiser.get_submodule(path)
        ref = next(iter(parts.values()))
        columns = []
        for block in column_blocks(linear, widths):
            part = parts.get(block.index)
            if part is None:
                part = block.weight.detach().to(device=ref.device, dtype=ref.dtype)
            elif part.shape != block.weight.shape:
                raise SlimDiffError(f"slim weight of column block {block.index} of {path} has shape "
                                    f"{tuple(part.shape)}, the plan expects {tuple(block.weight.shape)}")
            columns.append(part)
        if f"{path}.weight" in out:
            raise SlimDiffError(f"slim weights give both {path}.weight and column blocks of it")
        out[f"{path}.weight"] = torch.cat(columns, 1)
    return out


__all__ = [
    "ATTENTION", "BLOCKS", "CONTROLNETS", "CROSS",
    "FAMILIES", "FFN", "MODEL_DTYPE", "QK", "SELF", "TEXT_CONTEXT", "VO", "AttentionGrams", "AttentionStatistics",
    "BlockAdapter",
    "ColumnBlock", "ConditionInput",
    "ControlNetAdapter", "DenoiserFamily", "ExportInput", "KEEP_MASK", "LAST_HIDDEN_STATE", "NORMAL",
    "PENULTIMATE_HIDDEN_STATE", "POOLER_OUTPUT", "SIGMA", "ServedTextEncoder", "TEXT_EMBEDS", "TIMESTEP",
    "FFNEnergies", "FFNLinears",
    "FFNStatistics", "ModuleSite", "QKLinears", "ResidualEnergies",
    "SublayerTaps", "TextContextMoment", "TextTower", "VOLinears", "block_adapter",
    "controlnet_adapter", "controlnet_classes", "family_for", "family_named",
    "image_generators", "load_builtin", "module_sites",
    "assemble_column_blocks", "site_adapter", "site_linears", "site_weights_fingerprint", "starting_latents", "stat_key", "transformer_blocks",
]
