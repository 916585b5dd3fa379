"""Block adapters for FLUX's two transformer blocks (diffusers' ``FluxTransformerBlock`` and
``FluxSingleTransformerBlock``, both attending through a ``FluxAttention``).

Every FLUX attention normalises each head's queries and keys (RMS norms) and rotates them by their token's position
(rotary embeddings) before their product: both act between the two factors of W_Qᵀ W_K, which no rank-r factor
carries, so no FLUX attention has a Q·K site (their q·k width stays, as SD3.5's normalised attentions). Values are
neither normalised nor rotated: the V·O sites remain.

* **Double-stream blocks** (``FluxTransformerBlock``, at ``<path>``): MMDiT blocks as SD3's
  (:mod:`slimdiff.families.mmdit`) — an image and a text stream, each with its own adaLN-Zero norms, projections
  (with biases) and GELU(tanh) feed-forward, meet in one attention over their concatenated tokens (text first).
  Sites: ``<path>.attn.vo`` (both streams: to the closed forms one self-attention on the direct sum of the streams'
  inputs, :class:`~slimdiff.families.base.StreamStack`), ``<path>.ff`` and ``<path>.ff_context``. The updates are
  gated by the adaLN-Zero chunks 2 (attention) and 5 (MLP) of ``norm1`` / ``norm1_context``. SD3's adapter serves
  them (the same attribute layout); only the attention processor differs.
* **Single-stream blocks** (``FluxSingleTransformerBlock``): one stream (text and image tokens concatenated) whose
  normed tokens x feed an attention (no output projection of its own: ``pre_only``) and an MLP side by side, and one
  Linear projects both: ``proj_out(cat([attention(x), gelu(proj_mlp(x))]))``. Sites: ``<path>.attn.vo`` (``to_v``
  and the first ``heads·d`` input columns of ``proj_out``, which hold its bias) and ``<path>.proj_mlp`` (``proj_mlp``
  and the remaining columns of ``proj_out``): two sites owning column blocks of one Linear
  (:class:`~slimdiff.families.base.ColumnBlock`). Both updates are gated by chunk 2 of the block norm's three; the
  update of each site is its part of ``proj_out``'s output.

The slim attention runs through :class:`SlimFluxAttnProcessor` (v and head outputs narrower than q and k).
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn

from ..errors import SlimDiffError
from .base import (
    ATTENTION,
    BLOCKS,
    FFN,
    SELF,
    VO,
    BlockAdapter,
    FFNLinears,
    ModuleSite,
    SiteLinears,
    SublayerTaps,
    VOLinears,
    column_blocks,
    with_column_block,
)
from .blocks import _linear, _row_cost, slim_attention
from .mmdit import JointTransformerBlockAdapter, _ada_zero_gates, _single

_ATTN = "attn"
# the single-stream block's gate: chunk 2 of its adaLN-Zero norm's three (shift, scale, gate)
_GATE_SINGLE = 2
# the single-stream block's shared output projection and its MLP's up projection
_PROJ_OUT, _PROJ_MLP = "proj_out", "proj_mlp"


class SlimFluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` with value heads narrower than the query/key heads: q, k and v split into
    ``attn.heads`` heads each at its own width, RMS norms and rotary embeddings on q and k only (as diffusers), and
    the original softmax scale 1/√d of the q·k head width. With uncompressed weights it computes what the stock
    processor computes; a joint attention (double-stream block) returns the image and text outputs, a single-stream
    block's attention the concatenated head outputs."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise SlimDiffError("SlimFluxAttnProcessor does not take an attention mask (FLUX pipelines pass none)")

        def heads(x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, heads, width)
            return x.unflatten(-1, (attn.heads, -1))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:  # the text stream's tokens come first
            cq, ck = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = slim_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=attn.head_dim ** -0.5)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text = encoder_hidden_states.shape[1]
        image = attn.to_out[1](attn.to_out[0](out[:, text:].contiguous()))
        return image, attn.to_add_out(out[:, :text].contiguous())


def _check_attention(where: str, attn: nn.Module) -> None:
    if getattr(attn, "fused_projections", False):
        raise SlimDiffError(f"{where}: an attention with fused q/k/v projections (fuse_qkv_projections) is not "
                            "supported: slim the model before fusing")


@BLOCKS.register({FluxTransformerBlock: "FluxTransformerBlock"})
class FluxTransformerBlockAdapter(JointTransformerBlockAdapter):
    """SD3's MMDiT adapter (:mod:`slimdiff.families.mmdit`) serves FLUX's double-stream blocks — the same attention
    projections, feed-forwards, norms and adaLN-Zero gates; their normalised queries and keys leave no Q·K site:
    ``<block>.attn.vo`` / ``.ff`` / ``.ff_context`` — with FLUX's attention processor."""

    def sites(self, path: str, block: nn.Module) -> list[ModuleSite]:
        _check_attention(f"{path}.{_ATTN}", block.attn)
        return super().sites(path, block)

    def prepare_attention(self, block: nn.Module, site: ModuleSite) -> None:
        block.attn.set_processor(SlimFluxAttnProcessor())


@BLOCKS.register({FluxSingleTransformerBlock: "FluxSingleTransformerBlock"})
class FluxSingleTransformerBlockAdapter(BlockAdapter):
    """Sites: ``<block>.attn.vo`` (``to_v`` and proj_out's attention columns) / ``.proj_mlp`` (``proj_mlp`` and
    proj_out's MLP columns)."""

    def sites(self, path: str, block: nn.Module) -> list[ModuleSite]:
        attn = block.attn
        where = f"{path}.{_ATTN}"
        _check_attention(where, attn)
        if getattr(attn, "add_q_proj", None) is not None or not getattr(attn, "pre_only", False):
            raise SlimDiffError(f"{where}: a single-stream FLUX attention with its own output projection or a text "
                                "stream is not supported")
        v = _linear(attn.to_v, f"{where}.to_v")
        mlp = _linear(block.proj_mlp, f"{path}.{_PROJ_MLP}")
        out = _linear(block.proj_out, f"{path}.{_PROJ_OUT}")
        if not isinstance(block.act_mlp, nn.GELU):
            raise SlimDiffError(f"{path}.act_mlp: MLP activation {type(block.act_mlp).__name__} is not supported "
                                "(GELU only)")
        if v.out_features % attn.heads or out.in_features != v.out_features + mlp.out_features:
            raise SlimDiffError(f"{path}: {_PROJ_OUT} reads {out.in_features} features, not the attention's "
                                f"{v.out_features} ({attn.heads} heads) and the MLP's {mlp.out_features} side by side")
        heads = attn.heads
        return [ModuleSite(f"{where}.vo", VO, path, _ATTN, v.out_features // heads, heads,
                           heads * (_row_cost(v) + out.out_features), sublayer=_ATTN, attention=SELF),
                ModuleSite(f"{path}.{_PROJ_MLP}", FFN, path, None, mlp.out_features, 1,
                           _row_cost(mlp) + out.out_features, sublayer=_PROJ_MLP)]

    def column_blocks(self, block: nn.Module) -> dict[str, tuple[int, ...]]:
        return {_PROJ_OUT: (block.attn.to_v.out_features, block.proj_mlp.out_features)}

    def linears(self, block: nn.Module, site: ModuleSite) -> SiteLinears:
        attention_block, mlp_block = column_blocks(block.proj_out, self.column_blocks(block)[_PROJ_OUT])
        if site.kind == FFN:
            return FFNLinears(block.proj_mlp, mlp_block, False, {"proj": _PROJ_MLP, "down": _PROJ_OUT})
        return VOLinears(block.attn.to_v, attention_block, {"v": f"{_ATTN}.to_v", "out": _PROJ_OUT})

    def set_linear(self, block: nn.Module, site: ModuleSite, role: str, linear: nn.Linear) -> None:
        if role in ("v", "proj"):
            setattr(block.attn if role == "v" else block, "to_v" if role == "v" else _PROJ_MLP, linear)
            return
        # proj_out's column block of this site takes the new Linear's width; the other site's block keeps its
        # columns. Widths from the other site's Linear: this site's own may already have its new width.
        shared = block.proj_out
        if role == "out":
            other = block.proj_mlp.out_features
            widths, index = (shared.in_features - other, other), 0
        else:
            other = block.attn.to_v.out_features
            widths, index = (other, shared.in_features - other), 1
        block.proj_out = with_column_block(shared, widths, index, linear.in_features)

    def prepare_attention(self, block: nn.Module, site: ModuleSite) -> None:
        block.attn.set_processor(SlimFluxAttnProcessor())

    def taps(self, block: nn.Module) -> list[SublayerTaps]:
        attn = block.attn
        attention_block, mlp_block = column_blocks(block.proj_out, self.column_blocks(block)[_PROJ_OUT])
        gate = _single(_ada_zero_gates((block.norm,), _GATE_SINGLE))
        # the residual stream (text and image tokens) enters both sub-layers through the block's norm
        return [SublayerTaps(_ATTN, ATTENTION, residuals=(block.norm,), update=attention_block, attention=attn,
                             head_outputs=(attention_block,), query=attn.to_q, key=attn.to_k, heads=attn.heads,
                             gate=gate),
                SublayerTaps(_PROJ_MLP, FFN, residuals=(block.norm,), update=mlp_block, hidden=mlp_block, gate=gate)]

    def unit_macs(self, block: nn.Module, site: ModuleSite, tokens: Callable[[str], tuple[int, int]]) -> int:
        if site.kind == FFN:
            return site.unit_params * tokens(site.sublayer)[0]
        n = tokens(_ATTN)[0]  # text + image tokens, every one a query and a key
        return site.heads * (block.attn.to_v.in_features * n + n * n + block.proj_out.out_features * n)
