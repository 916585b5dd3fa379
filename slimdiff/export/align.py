"""Tensor-core-friendly head widths: zero-pad per-head q·k and v widths of slim attentions.

Fused attention kernels (TensorRT's MHA, flash / memory-efficient SDPA) want head widths that are multiples
of 8 and, for flash kernels, the same width for q·k and v. Zero padding keeps results exact:

* extra zero columns in q and k add ``0·0`` to every logit, and the softmax scale stays the module's original
  ``attn.scale`` (``SlimAttnProcessor`` and ``SlimJointAttnProcessor`` pass it explicitly), so the attention
  weights are unchanged (a joint attention's second stream, ``add_q_proj`` / ``add_k_proj``, is padded alike);
* extra zero columns in v (and ``add_v_proj``) give zero output columns, and the matching zero input columns of
  ``to_out[0]`` (and ``to_add_out``) drop them again.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimDiffError
from ..families.mmdit import SlimJointAttnProcessor
from ..rebuild import SlimAttnProcessor


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad_rows(linear: nn.Linear, heads: int, width: int) -> nn.Linear:
    """``linear`` with its output split into ``heads`` blocks, each zero-padded to ``width`` rows."""
    old = linear.out_features // heads
    new = nn.Linear(linear.in_features, heads * width, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        w = torch.zeros(heads, width, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
        w[:, :old] = linear.weight.view(heads, old, -1)
        new.weight.copy_(w.view(heads * width, -1))
        if linear.bias is not None:
            b = torch.zeros(heads, width, device=linear.bias.device, dtype=linear.bias.dtype)
            b[:, :old] = linear.bias.view(heads, old)
            new.bias.copy_(b.view(-1))
    return new.requires_grad_(False)


def _pad_columns(linear: nn.Linear, heads: int, width: int) -> nn.Linear:
    """``linear`` with its input split into ``heads`` blocks, each zero-padded to ``width`` columns."""
    old = linear.in_features // heads
    new = nn.Linear(heads * width, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        w = torch.zeros(linear.out_features, heads, width, device=linear.weight.device, dtype=linear.weight.dtype)
        w[:, :, :old] = linear.weight.view(linear.out_features, heads, old)
        new.weight.copy_(w.view(linear.out_features, -1))
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new.requires_grad_(False)


def planned_head_widths(model: nn.Module, multiple: int = 8, equal_qk_v: bool = True) -> dict[str, tuple]:
    """``{attention path: ((qk, v) now, (qk, v) aligned)}`` for every attention that needs padding."""
    from diffusers.models.attention_processor import Attention

    if multiple < 1:
        raise SlimDiffError(f"head-width multiple must be positive, got {multiple}")
    plan = {}
    for path, attn in model.named_modules():
        if not isinstance(attn, Attention):
            continue
        qk, v = attn.to_q.out_features // attn.heads, attn.to_v.out_features // attn.heads
        new_qk, new_v = _round_up(qk, multiple), _round_up(v, multiple)
        if equal_qk_v:
            new_qk = new_v = max(new_qk, new_v)
        if (new_qk, new_v) != (qk, v):
            plan[path] = ((qk, v), (new_qk, new_v))
    return plan


def align_head_widths(model: nn.Module, multiple: int = 8, equal_qk_v: bool = True) -> dict[str, tuple]:
    """Zero-pad, in place, every attention's per-head q·k and v widths up to a multiple of ``multiple``
    (and, with ``equal_qk_v``, both up to the wider of the two). Outputs are unchanged.

    Returns :func:`planned_head_widths` — the attentions that changed, with their widths before and after.
    """
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    plan = planned_head_widths(model, multiple, equal_qk_v)
    for path, ((qk, v), (new_qk, new_v)) in plan.items():
        attn = model.get_submodule(path)
        if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
            raise SlimDiffError(f"{path}: cannot pad an attention with group/spatial norm (VAE-style attention)")
        # a joint attention (MMDiT) projects its second stream with add_*_proj and outputs it through to_add_out
        joint = getattr(attn, "add_q_proj", None) is not None
        if new_qk != qk and (attn.norm_q is not None or getattr(attn, "norm_added_q", None) is not None):
            raise SlimDiffError(f"{path}: cannot pad the query/key heads of an attention that normalises them "
                                "(qk_norm): zero columns would change the norm")
        # MMDiT blocks run their attentions (SD3.5's image-only second one too) through the joint processor, which
        # applies their qk norms
        processor = SlimJointAttnProcessor if joint or isinstance(
            attn.processor, (JointAttnProcessor2_0, SlimJointAttnProcessor)) else SlimAttnProcessor
        if not isinstance(attn.processor, processor):
            # The stock processors infer the softmax scale from the (padded) width; ours keep attn.scale.
            attn.set_processor(processor())
        heads = attn.heads
        if new_qk != qk:
            for name in ("to_q", "to_k") + (("add_q_proj", "add_k_proj") if joint else ()):
                setattr(attn, name, _pad_rows(getattr(attn, name), heads, new_qk))
        if new_v != v:
            for name in ("to_v",) + (("add_v_proj",) if joint else ()):
                setattr(attn, name, _pad_rows(getattr(attn, name), heads, new_v))
            attn.to_out[0] = _pad_columns(attn.to_out[0], heads, new_v)
            if getattr(attn, "to_add_out", None) is not None:
                attn.to_add_out = _pad_columns(attn.to_add_out, heads, new_v)
    return plan
