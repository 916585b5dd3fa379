"""Stage F: give a UNet the shapes of a rank plan, and the attention processor those shapes need.

A slim attention has per-head query·key width ``r_qk`` and value width ``r_vo`` that may differ from each
other and from the original head width ``d_h``. The stock diffusers processor infers one head width from the
key projection, applies it to the value as well, and lets SDPA use ``1/sqrt(width)``; the compressed logits
approximate the *original* unscaled logits, so the original ``1/sqrt(d_h)`` must be kept. ``SlimAttnProcessor``
reshapes q/k and v separately and passes ``scale=attn.scale`` (set by diffusers from the original head width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SlimDiffError
from .models import FFN, QK, ModuleSite, module_sites
from .plan import RankPlan


class SlimAttnProcessor:
    """Attention with independent per-head q·k and v widths and the original softmax scale.

    With uncompressed weights it computes exactly what ``AttnProcessor2_0`` computes.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if hidden_states.ndim != 3:
            raise SlimDiffError("SlimAttnProcessor expects (batch, tokens, channels) inputs")
        residual = hidden_states
        batch, tokens, _ = hidden_states.shape
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        q = q.view(batch, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(batch, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        v = v.view(batch, -1, heads, v.shape[-1] // heads).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised Linear of a new shape on the same device/dtype (its weights are loaded right after)."""
    return nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=linear.bias is not None,
        device=linear.weight.device, dtype=linear.weight.dtype,
    )


def resize_site(unet: nn.Module, site: ModuleSite, rank: int) -> None:
    block = unet.get_submodule(site.block)
    if site.kind == FFN:
        act, down = block.ff.net[0], block.ff.net[2]
        gated = act.proj.out_features == 2 * site.width
        act.proj = _resized(act.proj, act.proj.in_features, (2 if gated else 1) * rank)
        block.ff.net[2] = _resized(down, rank, down.out_features)
        return
    attn = getattr(block, site.attn)
    width = site.heads * rank
    if site.kind == QK:
        attn.to_q = _resized(attn.to_q, attn.to_q.in_features, width)
        attn.to_k = _resized(attn.to_k, attn.to_k.in_features, width)
    else:
        attn.to_v = _resized(attn.to_v, attn.to_v.in_features, width)
        attn.to_out[0] = _resized(attn.to_out[0], width, attn.to_out[0].out_features)
    attn.set_processor(SlimAttnProcessor())


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
    """Copy new weights (state-dict names → tensors) into an already resized UNet; shapes must match."""
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
