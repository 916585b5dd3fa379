"""Block adapter for diffusers' ``JointTransformerBlock``: the MMDiT block of Stable Diffusion 3 (FLUX's
double-stream ``FluxTransformerBlock`` has the same layout: its adapter, :mod:`slimdiff.families.flux_blocks`,
is this one with FLUX's attention processor).

Two token streams, image and text, each with its own adaLN-Zero norms, projections and feed-forward, meet in one
attention over their concatenated tokens (``attn``: the image stream's ``to_q``/``to_k``/``to_v``/``to_out.0``, the
text stream's ``add_q_proj``/``add_k_proj``/``add_v_proj``/``to_add_out``). Sites of a block at ``<path>``:

* ``<path>.attn.qk`` and ``<path>.attn.vo``: the joint attention's per-head Q·K and V·O groups, both streams at
  once. The closed forms see one bias-free self-attention on the direct sum of the streams' inputs
  (:func:`~slimdiff.families.base.joint_tokens`, :class:`~slimdiff.families.base.StreamStack`): a rank is shared
  by the streams, as it must be — every image query meets every text key in the same head.
* ``<path>.ff`` and ``<path>.ff_context``: the image and text feed-forwards (GELU, tanh approximation).

* ``<path>.attn2.vo`` (and ``.attn2.qk`` without qk_norm): in SD3.5 Medium's dual-attention blocks
  (``use_dual_attention``), a second attention over the image tokens alone, whose output is added after the joint
  attention's.

The last block of SD3 is ``context_pre_only``: the text stream's attention outputs are dropped (no
``to_add_out``, no ``ff_context``), so its V·O site holds the image output projection alone and only the image
tokens' head outputs are observed. An attention with ``qk_norm`` (SD3.5) normalises each head's queries and keys
before their product, which no rank-r factor of W_Qᵀ W_K can carry: its Q·K width stays, its V·O site remains.

Calibration's view, per sub-layer: the joint attention's residual streams are the inputs of ``norm1`` (image) and
``norm1_context`` (text), its updates both outputs gated by ``gate_msa`` / ``c_gate_msa``; each feed-forward's
residual is the input of its ``norm2``, its update the output gated by its ``gate_mlp``; the second attention of a
dual-attention block reads the image stream entering the block (``norm1`` makes both attentions' inputs from it) and
its update is gated by ``gate_msa2``. The gates come from the block's ``temb`` through the adaLN-Zero projections:
chunks 2 and 5 of 6 (of 9 in a dual-attention block's ``norm1``, whose chunk 8 is ``gate_msa2``).
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.attention import JointTransformerBlock
from torch import nn

from ..errors import SlimDiffError
from .base import (
    ATTENTION,
    BLOCKS,
    FFN,
    QK,
    SELF,
    VO,
    BlockAdapter,
    JointQKLinears,
    JointVOLinears,
    ModuleSite,
    OutputStack,
    QKLinears,
    SiteLinears,
    StreamStack,
    SublayerTaps,
    VOLinears,
    hidden_and_context,
    joint_moment,
    joint_tokens,
)
from .blocks import (
    _linear,
    _row_cost,
    attention_sites,
    attention_unit_macs,
    ffn_linears,
    ffn_site,
    set_ffn_linear,
    slim_attention,
)

_ATTN = "attn"
_FFNS = ("ff", "ff_context")
# Which Linear of ``attn`` plays each role of the two streams (image, text); _stream_role names the second "q.1"...
_PROJECTIONS = {"q": ("to_q", "add_q_proj"), "k": ("to_k", "add_k_proj"), "v": ("to_v", "add_v_proj"),
                "out": ("to_out.0", "to_add_out")}
_ATTN2 = "attn2"
# adaLN-Zero chunks: shift, scale, gate (attention), shift, scale, gate (MLP) — and, in a dual-attention block's
# norm1 (SD35AdaLayerNormZeroX), shift, scale, gate of the second attention
_GATE_MSA, _GATE_MLP, _GATE_MSA2 = 2, 5, 8


class SlimJointAttnProcessor:
    """diffusers' joint attention (``JointAttnProcessor2_0``) with independent per-head q·k and v widths and the
    original softmax scale (see :class:`slimdiff.families.blocks.SlimAttnProcessor` for why the scale must be
    passed). With uncompressed weights it computes what the stock processor computes."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise SlimDiffError("SlimJointAttnProcessor does not take an attention mask (nor does diffusers' joint "
                                "attention processor)")
        batch, tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        out = slim_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :tokens]))
        if encoder_hidden_states is None:
            return image
        context = out[:, tokens:]
        return image, (context if attn.context_pre_only else attn.to_add_out(context))


def _joint_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, None]:
    """The joint attention's tokens in the direct sum of its streams' inputs: to the math, a self-attention."""
    image, text = hidden_and_context(args, kwargs)
    return joint_tokens(image, text), None


def _joint_input_moment(args: tuple, kwargs: dict) -> torch.Tensor:
    return joint_moment(*hidden_and_context(args, kwargs))


def _ada_zero_gates(norms: tuple[nn.Module, ...], chunk: int) -> Callable[[tuple, dict], tuple[torch.Tensor, ...]]:
    """The gates ``JointTransformerBlock.forward`` multiplies a sub-layer's outputs by: chunk ``chunk`` of each
    adaLN-Zero norm's projection of the block's ``temb`` (6 chunks; 9 in SD3.5's dual-attention norm1), shape
    (batch, 1, channels)."""
    def gates(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        out = []
        for norm in norms:
            emb = norm.linear(norm.silu(temb))
            out.append(emb.chunk(emb.shape[1] // norm.linear.in_features, dim=1)[chunk][:, None])
        return tuple(out)

    return gates


@BLOCKS.register({JointTransformerBlock: "JointTransformerBlock"})
class JointTransformerBlockAdapter(BlockAdapter):
    """Sites: ``<block>.attn.qk`` (absent with qk_norm) / ``.attn.vo`` / ``.attn2.qk`` / ``.attn2.vo`` (dual-attention
    blocks; no Q·K with qk_norm) /
    ``.ff`` / ``.ff_context`` (absent in a context_pre_only block)."""

    def sites(self, path: str, block: nn.Module) -> list[ModuleSite]:
        attn = block.attn
        where = f"{path}.{_ATTN}"
        if attn.add_q_proj is None:
            raise SlimDiffError(f"{where}: a joint attention without the text stream's projections is not supported")
        roles = {role: [_linear(attn.get_submodule(name), f"{where}.{name}") for name in self._streams(attn, role)]
                 for role in _PROJECTIONS}
        q, k, v = roles["q"], roles["k"], roles["v"]
        if any(lin.bias is None for lin in q + k + v):
            # the direct sum gives every stream a constant coordinate, whose factor a bias-free Linear cannot hold
            raise SlimDiffError(f"{where}: a joint attention with bias-free q/k/v projections is not supported "
                                "(diffusers' MMDiT blocks have biases)")
        heads = attn.heads
        if len({lin.out_features for lin in q + k}) != 1 or len({lin.out_features for lin in v}) != 1 \
                or q[0].out_features % heads or v[0].out_features % heads:
            raise SlimDiffError(f"{where}: the streams' projections do not split into {heads} equal heads")
        sites = []
        if attn.norm_q is None and attn.norm_added_q is None:  # qk_norm acts between the factors: no Q·K rank
            sites.append(ModuleSite(f"{where}.qk", QK, path, _ATTN, q[0].out_features // heads, heads,
                                    heads * sum(_row_cost(lin) for lin in q + k), sublayer=_ATTN, attention=SELF))
        sites.append(ModuleSite(f"{where}.vo", VO, path, _ATTN, v[0].out_features // heads, heads,
                                heads * (sum(_row_cost(lin) for lin in v) + sum(o.out_features for o in roles["out"])),
                                sublayer=_ATTN, attention=SELF))
        if getattr(block, "attn2", None) is not None:  # FLUX's MMDiT blocks have none
            if getattr(block.attn2, "add_q_proj", None) is not None:
                raise SlimDiffError(f"{path}.{_ATTN2}: a second joint attention is not supported")
            # an image-only self-attention; SD3.5 Medium normalises its queries and keys: no Q·K site then
            sites.extend(attention_sites(path, _ATTN2, SELF, block.attn2, qk=block.attn2.norm_q is None))
        sites.extend(ffn_site(path, name, getattr(block, name)) for name in self._ffns(block))
        return sites

    @staticmethod
    def _ffns(block: nn.Module) -> tuple[str, ...]:
        return _FFNS if block.ff_context is not None else _FFNS[:1]

    @staticmethod
    def _streams(attn: nn.Module, role: str) -> list[str]:
        names = _PROJECTIONS[role]
        return list(names[:1]) if role == "out" and attn.context_pre_only else list(names)

    def linears(self, block: nn.Module, site: ModuleSite) -> SiteLinears:
        if site.kind == FFN:
            return ffn_linears(block, site)
        if site.attn == _ATTN2:
            attn2 = block.attn2
            if site.kind == QK:
                return QKLinears(attn2.to_q, attn2.to_k, {"q": f"{_ATTN2}.to_q", "k": f"{_ATTN2}.to_k"})
            return VOLinears(attn2.to_v, attn2.to_out[0], {"v": f"{_ATTN2}.to_v", "out": f"{_ATTN2}.to_out.0"})
        attn = block.attn
        roles = ("q", "k") if site.kind == QK else ("v", "out")
        names = {(role if i == 0 else f"{role}.{i}"): f"{_ATTN}.{name}"
                 for role in roles for i, name in enumerate(self._streams(attn, role))}
        stacks = {role: tuple(attn.get_submodule(name) for name in self._streams(attn, role)) for role in roles}
        if site.kind == QK:
            return JointQKLinears(StreamStack(stacks["q"]), StreamStack(stacks["k"]), names)
        return JointVOLinears(StreamStack(stacks["v"]), OutputStack(stacks["out"]), names)

    def set_linear(self, block: nn.Module, site: ModuleSite, role: str, linear: nn.Linear) -> None:
        if site.kind == FFN:
            set_ffn_linear(block, site, role, linear)
            return
        base, _, stream = role.partition(".")
        name = _PROJECTIONS[base][int(stream or 0)]
        attn = block.get_submodule(site.attn)
        if name == "to_out.0":
            attn.to_out[0] = linear
        else:
            setattr(attn, name, linear)

    def prepare_attention(self, block: nn.Module, site: ModuleSite) -> None:
        block.get_submodule(site.attn).set_processor(SlimJointAttnProcessor())

    def taps(self, block: nn.Module) -> list[SublayerTaps]:
        attn = block.attn
        pre_only = attn.context_pre_only
        # the text stream of a context_pre_only block is read by the attention but not updated: not a residual here
        norms = (block.norm1,) if pre_only else (block.norm1, block.norm1_context)
        taps = [SublayerTaps(
            _ATTN, ATTENTION, residuals=norms, update=attn, update_streams=len(norms), attention=attn,
            head_outputs=(attn.to_out[0],) if pre_only else (attn.to_out[0], attn.to_add_out),
            query=StreamStack((attn.to_q, attn.add_q_proj)), key=StreamStack((attn.to_k, attn.add_k_proj)),
            heads=attn.heads, read_inputs=_joint_inputs, input_moment=_joint_input_moment,
            gate=_ada_zero_gates(norms, _GATE_MSA))]
        if getattr(block, "attn2", None) is not None:
            attn2 = block.attn2
            taps.append(SublayerTaps(
                _ATTN2, ATTENTION, residuals=(block.norm1,), update=attn2, attention=attn2,
                head_outputs=(attn2.to_out[0],), query=attn2.to_q, key=attn2.to_k, heads=attn2.heads,
                gate=_single(_ada_zero_gates((block.norm1,), _GATE_MSA2))))
        for name, norm, ada in (("ff", block.norm2, block.norm1), ("ff_context", block.norm2_context,
                                                                   block.norm1_context)):
            ff = getattr(block, name)
            if ff is not None:
                taps.append(SublayerTaps(name, FFN, residuals=(norm,), update=ff, hidden=ff.net[2],
                                         gate=_single(_ada_zero_gates((ada,), _GATE_MLP))))
        return taps

    def unit_macs(self, block: nn.Module, site: ModuleSite, tokens: Callable[[str], tuple[int, int]]) -> int:
        if site.kind == FFN:
            return site.unit_params * tokens(site.sublayer)[0]
        if site.attn == _ATTN2:  # a self-attention of the image tokens
            return attention_unit_macs(block.attn2, site, *tokens(_ATTN2))
        attn = block.attn
        joint = tokens(_ATTN)[0]  # image + text tokens
        image = tokens("ff")[0]
        text = joint - image
        if site.kind == QK:  # each stream's queries and keys, and the joint logits
            per_head = (attn.to_q.in_features + attn.to_k.in_features) * image \
                + (attn.add_q_proj.in_features + attn.add_k_proj.in_features) * text + joint * joint
        else:  # each stream's values, the weighted sums (every query's: diffusers computes them all), the outputs kept
            per_head = attn.to_v.in_features * image + attn.add_v_proj.in_features * text + joint * joint \
                + attn.to_out[0].out_features * image \
                + (0 if attn.context_pre_only else attn.to_add_out.out_features * text)
        return site.heads * per_head


def _single(gates: Callable[[tuple, dict], tuple[torch.Tensor, ...]]) -> Callable[[tuple, dict], torch.Tensor]:
    return lambda args, kwargs: gates(args, kwargs)[0]
