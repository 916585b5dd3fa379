"""The MMDiT block adapter (diffusers' JointTransformerBlock, SD3): joint-attention sites over two token streams,
the direct-sum view the closed forms see, the slim joint processor, and head-width alignment of joint attentions."""

import copy

import pytest
import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import JointAttnProcessor2_0

from slimdiff.errors import SlimDiffError
from slimdiff.export.align import align_head_widths
from slimdiff.families import FFN, QK, VO, block_adapter
from slimdiff.families.base import OutputStack, StreamStack, joint_tokens
from slimdiff.families.mmdit import SlimJointAttnProcessor
from slimdiff.rebuild import resize_site

DIM, HEADS = 32, 4


def _block(seed: int = 0, **kwargs) -> JointTransformerBlock:
    torch.manual_seed(seed)
    block = JointTransformerBlock(DIM, HEADS, DIM // HEADS, **kwargs).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero: random weights everywhere so that every path matters
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return block


def _inputs(seed: int = 1, image: int = 12, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, image, DIM, generator=g),
            "encoder_hidden_states": torch.randn(2, text, DIM, generator=g), "temb": torch.randn(2, DIM, generator=g)}


def _outputs(block, inputs):
    context, image = block(**inputs)
    return image if context is None else torch.cat([image, context], 1)


@pytest.mark.parametrize("variant", [{}, {"context_pre_only": True}, {"qk_norm": "rms_norm"}])
def test_slim_joint_processor_computes_what_diffusers_computes(variant):
    block = _block(**variant)
    assert isinstance(block.attn.processor, JointAttnProcessor2_0)
    inputs = _inputs()
    reference = _outputs(block, inputs)
    block.attn.set_processor(SlimJointAttnProcessor())
    torch.testing.assert_close(_outputs(block, inputs), reference, rtol=1e-5, atol=1e-5)


def test_sites_of_a_joint_block():
    adapter = block_adapter(_block())
    sites = {s.name: s for s in adapter.sites("b", _block())}
    assert list(sites) == ["b.attn.qk", "b.attn.vo", "b.ff", "b.ff_context"]
    qk, vo = sites["b.attn.qk"], sites["b.attn.vo"]
    assert (qk.kind, qk.width, qk.heads, vo.kind) == (QK, DIM // HEADS, HEADS, VO)
    # per head and unit of rank: one row (weights + bias) of each stream's q and k; of each stream's v, and one
    # column of each stream's output projection
    assert qk.unit_params == HEADS * 4 * (DIM + 1)
    assert vo.unit_params == HEADS * (2 * (DIM + 1) + 2 * DIM)
    assert sites["b.ff_context"].kind == FFN and sites["b.ff_context"].width == 4 * DIM

    last = {s.name: s for s in adapter.sites("b", _block(context_pre_only=True))}
    assert list(last) == ["b.attn.qk", "b.attn.vo", "b.ff"]  # the text stream ends here: no ff_context
    assert last["b.attn.vo"].unit_params == HEADS * (2 * (DIM + 1) + DIM)  # no to_add_out

    normed = [s.name for s in adapter.sites("b", _block(qk_norm="rms_norm"))]
    assert normed == ["b.attn.vo", "b.ff", "b.ff_context"]  # the norm sits between the Q·K factors

    with pytest.raises(SlimDiffError, match="use_dual_attention"):
        adapter.sites("b", _block(use_dual_attention=True, qk_norm="rms_norm"))


def test_stream_stacks_are_the_per_stream_projections_on_the_direct_sum():
    block = _block()
    attn = block.attn
    image, text = torch.randn(2, 6, DIM), torch.randn(2, 3, DIM)
    tokens = joint_tokens(image, text)
    assert tokens.shape == (2, 9, 2 * (DIM + 1))
    query = StreamStack((attn.to_q, attn.add_q_proj))
    torch.testing.assert_close(tokens @ query.weight.T, torch.cat([attn.to_q(image), attn.add_q_proj(text)], 1))
    assert query.bias is None and query.in_features == 2 * (DIM + 1)
    # split gives each stream's weight and bias back
    for (w, b), lin in zip(query.split(query.weight), (attn.to_q, attn.add_q_proj)):
        assert torch.equal(w, lin.weight) and torch.equal(b, lin.bias)
    out = OutputStack((attn.to_out[0], attn.to_add_out))
    z = torch.randn(5, DIM)
    torch.testing.assert_close(z @ out.weight.T + out.bias, torch.cat([attn.to_out[0](z), attn.to_add_out(z)], 1))


def test_joint_linears_name_every_stream_s_parameters():
    block = _block()
    adapter = block_adapter(block)
    qk, vo = [s for s in adapter.sites("b", block) if s.kind != FFN]
    lin = adapter.linears(block, qk)
    assert set(lin.modules()) == {"q", "q.1", "k", "k.1"}
    params = lin.parameters_at("q", lin.q.weight, None)
    assert set(params) == {"attn.to_q.weight", "attn.to_q.bias", "attn.add_q_proj.weight", "attn.add_q_proj.bias"}
    state = block.state_dict()
    assert all(torch.equal(value, state[name]) for name, value in params.items())
    lin = adapter.linears(block, vo)
    params = {**lin.parameters_at("v", lin.v.weight, None), **lin.parameters_at("out", lin.out.weight, lin.out.bias)}
    assert set(params) == {f"attn.{m}.{t}" for m in ("to_v", "add_v_proj", "to_out.0", "to_add_out")
                           for t in ("weight", "bias")}
    assert all(torch.equal(value, state[name]) for name, value in params.items())


@pytest.mark.parametrize("variant", [{}, {"context_pre_only": True}])
def test_resized_joint_attention_runs_and_alignment_padding_keeps_its_outputs(variant):
    block = _block(**variant)
    adapter = block_adapter(block)
    qk, vo = [s for s in adapter.sites("transformer_blocks.0", block) if s.kind != FFN]
    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList([block])
    resize_site(model, qk, 5)
    resize_site(model, vo, 3)
    with torch.no_grad():
        for p in block.attn.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    assert block.attn.add_q_proj.out_features == HEADS * 5 and block.attn.add_v_proj.out_features == HEADS * 3
    inputs = _inputs()
    reference = _outputs(block, inputs)
    padded = copy.deepcopy(model)
    changed = align_head_widths(padded, multiple=4)
    assert changed == {"transformer_blocks.0.attn": ((5, 3), (8, 8))}
    attn = padded.transformer_blocks[0].attn
    assert attn.add_k_proj.out_features == attn.add_v_proj.out_features == HEADS * 8
    assert isinstance(attn.processor, SlimJointAttnProcessor)
    torch.testing.assert_close(_outputs(padded.transformer_blocks[0], inputs), reference, rtol=1e-5, atol=1e-5)


def test_alignment_refuses_to_pad_normalised_query_heads():
    block = _block(qk_norm="rms_norm")
    model = torch.nn.Module()
    model.block = block
    with pytest.raises(SlimDiffError, match="qk_norm"):
        align_head_widths(model, multiple=16)  # 8-wide heads padded to 16 would change the RMS norm
