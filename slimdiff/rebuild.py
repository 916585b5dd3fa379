"""Stage F: give a denoiser the shapes of a rank plan (each block's adapter resizes its own Linears).

A slim attention has per-head query·key width ``r_qk`` and value width ``r_vo`` that may differ from each
other and from the original head width ``d_h``; the block adapter installs an attention processor that keeps
the original softmax scale (for diffusers attentions, :class:`SlimAttnProcessor`).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SlimDiffError
from .families import FFN, ModuleSite, assemble_column_blocks, module_sites, site_adapter
from .families.blocks import SlimAttnProcessor  # noqa: F401  (importable from here, as before)
from .plan import RankPlan


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised Linear of a new shape on the same device/dtype (its weights are loaded right after)."""
    return nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=linear.bias is not None,
        device=linear.weight.device, dtype=linear.weight.dtype,
    )


def resize_site(unet: nn.Module, site: ModuleSite, rank: int) -> None:
    """Replace, in place, the Linears of ``site`` by uninitialised ones of width ``rank``."""
    block, adapter = site_adapter(unet, site)
    lin = adapter.linears(block, site)
    current = lin.modules()
    for role, (fan_in, fan_out) in lin.shapes_at(rank, site.heads).items():
        adapter.set_linear(block, site, role, _resized(current[role], fan_in, fan_out))
    if site.kind != FFN:
        adapter.prepare_attention(block, site)


def apply_plan_shapes(unet: nn.Module, plan: RankPlan) -> nn.Module:
    """Resize, in place, every Linear of a site the plan compresses (weights left uninitialised).

    The plan must have been made for this architecture: every site it names must exist with the same width.
    """
    sites = {s.name: s for s in module_sites(unet)}
    for name, entry in plan.modules.items():
        site = sites.get(name)
        if site is None or site.width != entry.width or site.kind != entry.kind:
            raise SlimDiffError(f"the rank plan does not match this UNet at {name!r}")
        if entry.rank < site.width:
            resize_site(unet, site, entry.rank)
    return unet


def load_slim_weights(unet: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy new weights (state-dict names → tensors; the new columns of a shared Linear's blocks are assembled
    into its weight first) into an already resized UNet; shapes must match."""
    tensors = assemble_column_blocks(unet, tensors)
    state = unet.state_dict()
    for key, value in tensors.items():
        if key not in state:
            raise SlimDiffError(f"slim weight {key!r} has no counterpart in the UNet")
        if state[key].shape != value.shape:
            raise SlimDiffError(f"slim weight {key!r} has shape {tuple(value.shape)}, "
                                f"the plan expects {tuple(state[key].shape)}")
    with torch.no_grad():
        params = dict(unet.named_parameters())
        for key, value in tensors.items():
            params[key].copy_(value)
