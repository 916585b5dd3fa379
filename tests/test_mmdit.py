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


DUAL = {"use_dual_attention": True, "qk_norm": "rms_norm"}  # SD3.5 Medium's first blocks


@pytest.mark.parametrize("variant", [{}, {"context_pre_only": True}, {"qk_norm": "rms_norm"}, DUAL])
def test_slim_joint_processor_computes_what_diffusers_computes(variant):
    block = _block(**variant)
    assert isinstance(block.attn.processor, JointAttnProcessor2_0)
    inputs = _inputs()
    reference = _outputs(block, inputs)
    for attn in (block.attn, block.attn2):
        if attn is not None:
            attn.set_processor(SlimJointAttnProcessor())
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

    unbiased = _block()
    unbiased.attn.add_k_proj = torch.nn.Linear(DIM, DIM, bias=False)
    with pytest.raises(SlimDiffError, match="bias-free"):  # refused before any calibration
        adapter.sites("b", unbiased)

    dual = {s.name: s for s in adapter.sites("b", _block(**DUAL))}
    assert list(dual) == ["b.attn.vo", "b.attn2.vo", "b.ff", "b.ff_context"]
    assert dual["b.attn2.vo"].unit_params == HEADS * ((DIM + 1) + DIM)  # one stream: to_v row, to_out column
    assert [s.name for s in adapter.sites("b", _block(use_dual_attention=True))][:4] == [
        "b.attn.qk", "b.attn.vo", "b.attn2.qk", "b.attn2.vo"]


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


def test_the_joint_moment_is_the_block_diagonal_of_the_streams_moments():
    block = _block()
    tap = next(t for t in block_adapter(block).taps(block) if t.sublayer == "attn")
    inputs = {"hidden_states": torch.randn(2, 6, DIM), "encoder_hidden_states": torch.randn(2, 3, DIM)}
    tokens, context = tap.read_inputs((), inputs)
    assert context is None  # to the math, a self-attention
    dense = tokens.reshape(-1, tokens.shape[-1]).double()
    torch.testing.assert_close(tap.input_moment((), inputs), dense.T @ dense, rtol=1e-12, atol=1e-12)


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


# --- calibration of a whole SD3 transformer (builtin:tiny-sd3) ---------------------------------------------------


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).double()


def _head_gram(y: torch.Tensor, heads: int) -> torch.Tensor:
    y = _f64(y).reshape(-1, heads, y.shape[-1] // heads)
    return torch.einsum("nhd,nhe->hde", y, y)


@pytest.fixture(scope="module")
def observed():
    """A calibration of builtin:tiny-sd3 and, from hooks of the test's own on the same run, what it should hold per
    block: the joint queries' per-head Grams (both streams, biases included), the head outputs of the tokens whose
    outputs are used, the energies of the updates of both streams (stream after minus before each gated sub-layer)
    and the token counts of each stream."""
    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.families import family_for
    from slimdiff.models import build_builtin

    pipe = build_builtin("builtin:tiny-sd3")
    transformer = pipe.transformer
    seen: dict = {}

    def add(key, value):
        seen[key] = seen.get(key, 0) + value

    handles, stream = [], {}
    for i, block in enumerate(transformer.transformer_blocks):
        path, attn = f"transformer_blocks.{i}", block.attn

        def block_in(_m, args, kwargs, path=path):
            stream[path] = (kwargs["hidden_states"], kwargs["encoder_hidden_states"])

        def attn_in(_m, args, kwargs, path=path, attn=attn):
            x, c = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            queries = torch.cat([attn.to_q(x), attn.add_q_proj(c)], 1)
            add(f"{path}.attn.q_gram", _head_gram(queries, attn.heads))
            seen[f"{path}.tokens"] = (x.shape[1], c.shape[1])

        def norm2_in(_m, args, path=path):  # the image stream after the attention's update
            add(f"{path}.attn.update", (_f64(args[0]) - _f64(stream[path][0])).pow(2).sum())
            stream[path + ".ff"] = args[0]

        def norm2_context_in(_m, args, path=path):
            add(f"{path}.attn.update", (_f64(args[0]) - _f64(stream[path][1])).pow(2).sum())
            stream[path + ".ff_context"] = args[0]

        def block_out(_m, _args, _kwargs, out, path=path):
            context, image = out
            add(f"{path}.ff.update", (_f64(image) - _f64(stream[path + ".ff"])).pow(2).sum())
            if context is not None:
                add(f"{path}.ff_context.update", (_f64(context) - _f64(stream[path + ".ff_context"])).pow(2).sum())

        def z_in(_m, args, path=path, heads=attn.heads):
            add(f"{path}.attn.z_gram", _head_gram(args[0], heads))

        handles += [block.register_forward_pre_hook(block_in, with_kwargs=True),
                    attn.register_forward_pre_hook(attn_in, with_kwargs=True),
                    block.norm2.register_forward_pre_hook(norm2_in),
                    block.register_forward_hook(block_out, with_kwargs=True),
                    attn.to_out[0].register_forward_pre_hook(z_in)]
        if block.norm2_context is not None:
            handles += [block.norm2_context.register_forward_pre_hook(norm2_context_in),
                        attn.to_add_out.register_forward_pre_hook(z_in)]
    config = CalibrationConfig(steps=3, pass1_prompts=2, batch_size=2)

    def loop(prompts, seeds):  # pass 1 runs first; the test keeps pass 2's sums
        seen.clear()
        family_for(pipe).calibration_loop(pipe, config)(prompts, seeds)

    stats = calibrate(transformer, ["a red circle", "two blue squares on a long green line"], None, config, loop=loop,
                      progress=False)
    for h in handles:
        h.remove()
    return pipe, stats, seen


def test_joint_attention_statistics_span_both_streams(observed):
    from slimdiff.families.base import seq_key

    pipe, stats, seen = observed
    blocks = pipe.transformer.transformer_blocks
    assert blocks[-1].context_pre_only and not blocks[0].context_pre_only  # both layouts are checked
    for i, _block in enumerate(blocks):
        path = f"transformer_blocks.{i}"
        attn = stats.attention(f"{path}.attn")
        image, text = seen[f"{path}.tokens"]
        assert attn.seq == attn.key_tokens == image + text
        assert int(stats.tensors[seq_key(f"{path}.ff")]) == image
        torch.testing.assert_close(attn.grams.q_gram.sum(0), seen[f"{path}.attn.q_gram"], rtol=1e-5, atol=1e-6)
        # the head outputs of the image tokens, and of the text tokens unless the text stream ends here
        torch.testing.assert_close(attn.grams.z_gram.sum(0), seen[f"{path}.attn.z_gram"], rtol=1e-8, atol=1e-8)
        assert float(attn.grams.z_tokens.sum()) == (image if _block.context_pre_only else image + text) * 2 * 2 * 3
        # the joint input moment: 2·(C+1) wide, the image and text coordinates never met in one token
        dim = _block.attn.to_q.in_features
        moment = attn.qk_input_moment
        assert moment.shape == (2 * (dim + 1),) * 2 and not moment[:dim + 1, dim + 1:].any()


def test_update_energies_are_those_of_both_gated_streams(observed):
    pipe, stats, seen = observed
    for i, block in enumerate(pipe.transformer.transformer_blocks):
        subs = ("attn", "ff") + (() if block.ff_context is None else ("ff_context",))
        for sub in subs:
            path = f"transformer_blocks.{i}.{sub}"
            energies = stats.attention(path).residual if sub == "attn" else stats.ffn(path).residual
            torch.testing.assert_close(energies.upd_energy.sum(), seen[f"{path}.update"], rtol=1e-5, atol=0)


def test_slim_transformer_error_grows_with_the_budget(observed):
    from slimdiff.families import family_for, module_sites
    from slimdiff.slim import SlimConfig, slim_unet

    pipe, stats, _ = observed
    transformer = pipe.transformer
    call = family_for(transformer).dummy_call(transformer.config, 2, (8, 8))
    g = torch.Generator().manual_seed(3)
    call = {k: torch.randn(v.shape, generator=g) if k != "timestep" else torch.full_like(v, 500.0)
            for k, v in call.items()}
    with torch.no_grad():
        reference = transformer(**call).sample
    errors = []
    for budget in (0.15, 0.4):
        model = copy.deepcopy(transformer)
        slim_unet(model, stats, SlimConfig(budget=budget, r_min=1, align=1), progress=False)
        assert any(isinstance(b.attn.processor, SlimJointAttnProcessor) for b in model.transformer_blocks)
        with torch.no_grad():
            out = model(**call).sample
        errors.append(float((out - reference).norm() / reference.norm()))
    assert 0 < errors[0] < errors[1] < 1
    assert {s.kind for s in module_sites(transformer)} == {FFN, QK, VO}


def test_a_dual_attention_transformer_calibrates_and_slims():
    """SD3.5 Medium's layout (second image-only attention with qk_norm in the first blocks): the second attention's
    update energy is that of its gated output, and the slim transformer runs with both processors."""
    from diffusers import SD3Transformer2DModel

    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.families import family_for, module_sites
    from slimdiff.slim import SlimConfig, slim_unet

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=16, caption_projection_dim=32,
                                        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                                        qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    family = family_for(transformer)
    block = transformer.transformer_blocks[0]
    seen = {}

    def attn2_out(_m, args, kwargs, out):  # the gate: chunk 8 of 9 of norm1's projection of temb
        temb = seen["temb"]
        gate = block.norm1.linear(block.norm1.silu(temb)).chunk(9, dim=1)[8][:, None]
        seen["update"] = seen.get("update", 0) + (out * gate).double().pow(2).sum()

    def block_in(_m, args, kwargs):
        seen["temb"] = kwargs["temb"]

    def loop(prompts, seeds):
        seen.pop("update", None)
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            call = {k: torch.randn(v.shape, generator=g) for k, v in family.dummy_call(transformer.config, 2,
                                                                                     (8, 8), 6).items()}
            for t in (900.0, 400.0):
                with torch.no_grad():
                    transformer(**{**call, "timestep": torch.full((2,), t)})

    handles = [block.attn2.register_forward_hook(attn2_out, with_kwargs=True),
               block.register_forward_pre_hook(block_in, with_kwargs=True)]
    stats = calibrate(transformer, ["a", "b", "c"], None, CalibrationConfig(steps=2, pass1_prompts=3, batch_size=3),
                      loop=loop, progress=False)
    for h in handles:
        h.remove()
    assert "transformer_blocks.0.attn2.vo" in {s.name for s in module_sites(transformer)}
    energies = stats.attention("transformer_blocks.0.attn2").residual
    torch.testing.assert_close(energies.upd_energy.sum(), seen["update"], rtol=1e-6, atol=0)
    slim = copy.deepcopy(transformer)
    slim_unet(slim, stats, SlimConfig(budget=0.3, r_min=1, align=1), progress=False)
    assert slim.transformer_blocks[0].attn2.to_v.out_features < block.attn2.to_v.out_features
    assert isinstance(slim.transformer_blocks[0].attn2.processor, SlimJointAttnProcessor)
    call = family.dummy_call(transformer.config, 1, (8, 8), 6)
    g = torch.Generator().manual_seed(9)
    call = {k: torch.randn(v.shape, generator=g) for k, v in call.items()}
    with torch.no_grad():
        dense, out = transformer(**call).sample, slim(**call).sample
    assert 0 < float((out - dense).norm() / dense.norm()) < 0.5
