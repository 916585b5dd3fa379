"""Block adapter for diffusers' ``BasicTransformerBlock`` (SD-1.x, SD-2.x and SDXL UNets; PixArt's DiT).

Layout it knows: ``attn1`` (self-attention), optional ``attn2`` (cross-attention) and ``ff`` = ``net[0]`` (GEGLU
or GELU activation holding the up projection ``proj``) → dropout → ``net[2]`` (down projection). Each diffusers
``Attention`` has ``to_q``, ``to_k``, ``to_v`` and ``to_out[0]``. Two of the block's norm types:

* ``layer_norm`` (SD, SDXL): ``norm1`` → attn1, ``norm2`` → attn2, ``norm3`` → ff, outputs added unscaled;
* ``ada_norm_single`` (PixArt): ``norm1`` → attn1 and ``norm2`` → ff, both modulated by the timestep
  embedding; attn2 reads the residual stream itself; the attn1 and ff outputs are scaled per channel by gates
  taken from the block's ``timestep`` input (``scale_shift_table`` + the embedding, in six chunks).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU, GELU
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from ..errors import SlimDiffError
from .base import (
    ATTENTION,
    BLOCKS,
    CROSS,
    FFN,
    QK,
    SELF,
    VO,
    BlockAdapter,
    FFNLinears,
    ModuleSite,
    QKLinears,
    SiteLinears,
    SublayerTaps,
    VOLinears,
)


def slim_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of (batch, heads, tokens, width) heads whose q·k width and v width may
    differ (a slim attention's), on a fused kernel where the widths alone would rule it out.

    PyTorch's only fused CPU kernel (flash) takes one width for q, k and v; other widths fall to the math path,
    which materialises every attention matrix: on this project's 2-core CPU a (4 heads, 1024 tokens, q·k 128,
    v 64) call took 230 ms there and 149 ms with v zero-padded to 128 (as long as the dense call). So on the CPU
    the narrower side is zero-padded to the wider one, which is exact — zero q·k columns add nothing to a logit
    (the softmax scale is passed explicitly), zero v columns give output columns that are cut off again. CUDA's
    memory-efficient kernel takes a v width of its own, and whether padding to reach the flash kernel pays there
    is measured, not assumed (``slimdiff bench`` attention study); an ONNX export keeps the native widths (ONNX
    Runtime's Attention op takes them; TensorRT engines pad their weights: :mod:`slimdiff.export.align`)."""
    qk, width = q.shape[-1], v.shape[-1]
    if qk == width or q.device.type != "cpu" or torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    wide = max(qk, width)
    q, k, v = (F.pad(x, (0, wide - x.shape[-1])) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)[..., :width]


class SlimAttnProcessor:
    """Attention with independent per-head q·k and v widths and the original softmax scale.

    A slim attention has per-head q·k width ``r_qk`` and value width ``r_vo`` that may differ from each other and
    from the original head width ``d_h``. The stock diffusers processor infers one head width from the key
    projection, applies it to the value as well, and lets SDPA use ``1/sqrt(width)``; the compressed logits
    approximate the *original* unscaled logits, so the original ``1/sqrt(d_h)`` must be kept: this processor
    reshapes q/k and v separately and passes ``scale=attn.scale`` (set by diffusers from the original width).
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
        out = slim_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _linear(module: nn.Module, where: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise SlimDiffError(f"{where}: expected a Linear layer, found {type(module).__name__}")
    return module


def _row_cost(lin: nn.Linear) -> int:
    return lin.in_features + (1 if lin.bias is not None else 0)


# -- a diffusers Attention (to_q, to_k, to_v, to_out.0) ----------------------------------------------------------


def attention_sites(path: str, name: str, role: str, attn: nn.Module, qk: bool = True) -> list[ModuleSite]:
    """The Q·K (unless ``qk`` is False: queries and keys normalised per head) and V·O sites of the diffusers
    ``Attention`` at ``<path>.<name>``, a ``role`` (SELF / CROSS) attention."""
    where = f"{path}.{name}"
    q = _linear(attn.to_q, f"{where}.to_q")
    k = _linear(attn.to_k, f"{where}.to_k")
    v = _linear(attn.to_v, f"{where}.to_v")
    o = _linear(attn.to_out[0], f"{where}.to_out.0")
    heads = attn.heads
    if q.out_features != k.out_features or q.out_features % heads or v.out_features % heads:
        raise SlimDiffError(f"{where}: projections of widths {q.out_features}/{k.out_features}/"
                            f"{v.out_features} do not split into {heads} equal heads")
    vo = ModuleSite(f"{where}.vo", VO, path, name, v.out_features // heads, heads,
                    heads * (_row_cost(v) + o.out_features), sublayer=name, attention=role)
    if not qk:
        return [vo]
    return [ModuleSite(f"{where}.qk", QK, path, name, q.out_features // heads, heads,
                       heads * (_row_cost(q) + _row_cost(k)), sublayer=name, attention=role), vo]


def attention_unit_macs(attn: nn.Module, site: ModuleSite, queries: int, keys: int) -> int:
    """MACs per sample removed per unit of ``site``'s rank in a diffusers ``Attention`` of ``queries`` query and
    ``keys`` key/value tokens: the projections and the attention products."""
    if site.kind == QK:
        per_head = attn.to_q.in_features * queries + attn.to_k.in_features * keys + queries * keys
    else:
        per_head = attn.to_v.in_features * keys + attn.to_out[0].out_features * queries + queries * keys
    return site.heads * per_head


# -- diffusers FeedForward (``net[0]`` GEGLU/GELU holding ``proj`` → dropout → ``net[2]``), at any sublayer path --


def ffn_site(path: str, sublayer: str, ff: nn.Module) -> ModuleSite:
    """The FFN site of the diffusers ``FeedForward`` at ``<path>.<sublayer>``."""
    where = f"{path}.{sublayer}"
    act = ff.net[0] if hasattr(ff, "net") else None
    if not isinstance(act, (GEGLU, GELU)):
        raise SlimDiffError(
            f"{where}: feed-forward activation {type(act).__name__} is not supported (GEGLU or GELU only)"
        )
    proj = _linear(act.proj, f"{where}.net.0.proj")
    down = _linear(ff.net[2], f"{where}.net.2")
    gated = isinstance(act, GEGLU)
    inner = proj.out_features // 2 if gated else proj.out_features
    if down.in_features != inner:
        raise SlimDiffError(f"{where}: projection width {inner} does not match down-projection {down.in_features}")
    unit = (2 if gated else 1) * _row_cost(proj) + down.out_features
    return ModuleSite(where, FFN, path, None, inner, 1, unit, sublayer=sublayer)


def ffn_linears(block: nn.Module, site: ModuleSite) -> FFNLinears:
    ff = block.get_submodule(site.sublayer)
    proj, down = ff.net[0].proj, ff.net[2]
    return FFNLinears(proj, down, proj.out_features == 2 * site.width,
                      {"proj": f"{site.sublayer}.net.0.proj", "down": f"{site.sublayer}.net.2"})


def set_ffn_linear(block: nn.Module, site: ModuleSite, role: str, linear: nn.Linear) -> None:
    ff = block.get_submodule(site.sublayer)
    if role == "proj":
        ff.net[0].proj = linear
    else:
        ff.net[2] = linear


_FFN = "ff"
LAYER_NORM, ADA_NORM_SINGLE = "layer_norm", "ada_norm_single"
# Per norm type: the module whose input is the residual stream entering attn1 / attn2 / ff (None: the sub-layer
# itself), and the chunk of the adaLN modulation that gates each sub-layer's output (None: added unscaled).
_RESIDUAL_TAPS = {LAYER_NORM: {"attn1": "norm1", "attn2": "norm2", _FFN: "norm3"},
                  ADA_NORM_SINGLE: {"attn1": "norm1", "attn2": None, _FFN: "norm2"}}
_GATE_CHUNKS = {LAYER_NORM: {}, ADA_NORM_SINGLE: {"attn1": 2, _FFN: 5}}  # gate_msa, gate_mlp of six
_ATTENTIONS = (("attn1", SELF), ("attn2", CROSS))


def _ada_norm_single_gate(block: nn.Module, chunk: int) -> Callable[[tuple, dict], torch.Tensor]:
    """The gate ``BasicTransformerBlock.forward`` multiplies a sub-layer's output by (ada_norm_single):
    chunk ``chunk`` of ``scale_shift_table + timestep`` split in six, shape (batch, 1, channels)."""
    def gate(args: tuple, kwargs: dict) -> torch.Tensor:
        temb = kwargs.get("timestep", args[4] if len(args) > 4 else None)
        table = block.scale_shift_table
        return (table[None] + temb.reshape(temb.shape[0], 6, -1)).chunk(6, dim=1)[chunk]

    return gate


@BLOCKS.register({BasicTransformerBlock: "BasicTransformerBlock"})
class BasicTransformerBlockAdapter(BlockAdapter):
    """Sites: ``<block>.attn1.qk`` / ``.attn1.vo`` / ``.attn2.qk`` / ``.attn2.vo`` / ``.ff``."""

    # --- sites ------------------------------------------------------------------------------------------

    def sites(self, path: str, block: nn.Module) -> list[ModuleSite]:
        self._check_layout(path, block)
        sites: list[ModuleSite] = []
        for name, role in _ATTENTIONS:
            attn = getattr(block, name, None)
            if attn is not None:
                sites.extend(self._attention_sites(path, name, role, attn))
        if getattr(block, _FFN, None) is None:
            raise SlimDiffError(f"{path}: transformer block without a feed-forward is not supported")
        sites.append(ffn_site(path, _FFN, block.ff))
        return sites

    @staticmethod
    def _check_layout(path: str, block: nn.Module) -> None:
        """Refuse block variants whose data flow differs from the two layouts the taps describe."""
        norm = getattr(block, "norm_type", LAYER_NORM)
        if norm not in _RESIDUAL_TAPS:
            raise SlimDiffError(f"{path}: BasicTransformerBlock with norm_type={norm!r} is not supported "
                                f"({', '.join(_RESIDUAL_TAPS)} only)")
        variants = [flag for flag, bad in (
            ("only_cross_attention", getattr(block, "only_cross_attention", False)),
            ("double_self_attention", block.attn2 is not None and not block.attn2.is_cross_attention),
            ("pos_embed", getattr(block, "pos_embed", None) is not None),
        ) if bad]
        if variants:
            raise SlimDiffError(f"{path}: BasicTransformerBlock with {', '.join(variants)} is not supported")

    @staticmethod
    def _attention_sites(path: str, name: str, role: str, attn: nn.Module) -> list[ModuleSite]:
        unsupported = [
            flag for flag, bad in (
                ("qk_norm", getattr(attn, "norm_q", None) is not None),
                ("added_kv_proj", getattr(attn, "add_k_proj", None) is not None),
                ("group_norm", getattr(attn, "group_norm", None) is not None),
                ("spatial_norm", getattr(attn, "spatial_norm", None) is not None),
                ("kv_heads", getattr(attn, "is_cross_attention", False) is None),
            ) if bad
        ]
        if unsupported:
            raise SlimDiffError(f"{path}.{name}: attention with {', '.join(unsupported)} is not supported")
        return attention_sites(path, name, role, attn)

    # --- weights ----------------------------------------------------------------------------------------

    def linears(self, block: nn.Module, site: ModuleSite) -> SiteLinears:
        if site.kind == FFN:
            return ffn_linears(block, site)
        attn = getattr(block, site.attn)
        a = site.attn
        if site.kind == QK:
            return QKLinears(attn.to_q, attn.to_k, {"q": f"{a}.to_q", "k": f"{a}.to_k"})
        return VOLinears(attn.to_v, attn.to_out[0], {"v": f"{a}.to_v", "out": f"{a}.to_out.0"})

    def set_linear(self, block: nn.Module, site: ModuleSite, role: str, linear: nn.Linear) -> None:
        if site.kind == FFN:
            set_ffn_linear(block, site, role, linear)
            return
        attn = getattr(block, site.attn)
        if role == "out":
            attn.to_out[0] = linear
        else:
            setattr(attn, f"to_{role}", linear)

    def prepare_attention(self, block: nn.Module, site: ModuleSite) -> None:
        getattr(block, site.attn).set_processor(SlimAttnProcessor())

    # --- hooks and costs --------------------------------------------------------------------------------

    def taps(self, block: nn.Module) -> list[SublayerTaps]:
        norm = getattr(block, "norm_type", LAYER_NORM)

        def placement(sublayer: str, module: nn.Module) -> dict:
            residual = _RESIDUAL_TAPS[norm][sublayer]
            chunk = _GATE_CHUNKS[norm].get(sublayer)
            return {"residuals": (module if residual is None else getattr(block, residual),), "update": module,
                    "gate": None if chunk is None else _ada_norm_single_gate(block, chunk)}

        taps = []
        for name, _role in _ATTENTIONS:
            attn = getattr(block, name, None)
            if attn is not None:
                taps.append(SublayerTaps(name, ATTENTION, attention=attn, head_outputs=(attn.to_out[0],),
                                         query=attn.to_q, key=attn.to_k, heads=attn.heads,
                                         **placement(name, attn)))
        taps.append(SublayerTaps(_FFN, FFN, hidden=block.ff.net[2], **placement(_FFN, block.ff)))
        return taps

    def unit_macs(self, block: nn.Module, site: ModuleSite, tokens: Callable[[str], tuple[int, int]]) -> int:
        if site.kind == FFN:  # the FFN runs on the block's tokens, the query tokens of its self-attention
            return site.unit_params * tokens("attn1")[0]
        return attention_unit_macs(getattr(block, site.attn), site, *tokens(site.attn))

