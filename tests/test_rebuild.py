import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from slimdiff.errors import SlimDiffError
from slimdiff.models import module_sites
from slimdiff.plan import RankPlan
from slimdiff.rebuild import SlimAttnProcessor, apply_plan_shapes
from slimdiff.serialization import load_slim, save_slim

INPUTS = lambda: (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(321),
                  torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1)))


def test_slim_processor_matches_stock_processor(tiny_pipe):
    unet = tiny_pipe.unet
    x, t, e = INPUTS()
    unet.set_attn_processor(AttnProcessor2_0())
    ref = unet(x, t, e).sample
    unet.set_attn_processor(SlimAttnProcessor())
    assert torch.allclose(unet(x, t, e).sample, ref, atol=1e-6, rtol=0)


def test_slim_processor_keeps_original_scale():
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=32, heads=2, dim_head=16)
    attn.to_q = torch.nn.Linear(32, 2 * 8, bias=False)   # q·k width 8 per head
    attn.to_k = torch.nn.Linear(32, 2 * 8, bias=False)
    attn.to_v = torch.nn.Linear(32, 2 * 24, bias=False)  # value width 24 per head
    attn.to_out[0] = torch.nn.Linear(48, 32)
    attn.set_processor(SlimAttnProcessor())
    x = torch.randn(1, 5, 32)
    q = attn.to_q(x).view(1, 5, 2, 8).transpose(1, 2)
    k = attn.to_k(x).view(1, 5, 2, 8).transpose(1, 2)
    v = attn.to_v(x).view(1, 5, 2, 24).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / 16 ** 0.5, dim=-1)  # 1/sqrt(original head width 16)
    ref = attn.to_out[0]((p @ v).transpose(1, 2).reshape(1, 5, 48))
    assert torch.allclose(attn(x), ref, atol=1e-6)


def _halved_plan(unet):
    sites = module_sites(unet)
    return RankPlan.from_ranks(sites, {s.name: max(8, s.width // 2) for s in sites}, info={"source_model": "builtin:tiny"})


@pytest.mark.parametrize("qk, v", [(16, 8), (8, 16), (16, 16)])
def test_slim_attention_of_unequal_widths_is_exact_and_fused_on_the_cpu(qk, v):
    """Slim heads whose q·k and v widths differ are zero-padded to one width on the CPU, where the fused (flash)
    kernel takes one width only: the same numbers as the native call, without its math path."""
    from torch.profiler import ProfilerActivity, profile

    from slimdiff.families.blocks import slim_attention

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 40, qk, generator=gen), torch.randn(2, 3, 24, qk, generator=gen)
    value = torch.randn(2, 3, 24, v, generator=gen)
    mask = torch.ones(2, 1, 40, 24, dtype=torch.bool)
    mask[1, :, :, 20:] = False  # the second sample's last keys are padding
    scale = 0.125
    for attn_mask in (None, mask):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, value, attn_mask=attn_mask, scale=scale)
        got = slim_attention(q, k, value, attn_mask=attn_mask, scale=scale)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        slim_attention(q, k, value, scale=scale)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.key for e in prof.key_averages()}


def test_rebuilt_parameter_count_equals_plan_and_round_trip_is_bit_identical(tiny_pipe, tmp_path):
    unet = tiny_pipe.unet
    plan = _halved_plan(unet)
    before = sum(p.numel() for p in unet.parameters())
    apply_plan_shapes(unet, plan)
    torch.manual_seed(0)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert before - sum(p.numel() for p in unet.parameters()) == plan.params_removed > 0
    x, t, e = INPUTS()
    ref = unet(x, t, e).sample
    save_slim(unet, plan, tmp_path / "slim")
    loaded = load_slim(tmp_path / "slim")
    assert torch.equal(loaded(x, t, e).sample, ref)
    assert loaded.slim_plan.modules == plan.modules
    with pytest.raises(SlimDiffError, match="already exists"):
        save_slim(unet, plan, tmp_path / "slim")
    assert [p.name for p in tmp_path.iterdir()] == ["slim"]  # no temporary leftovers


def test_corrupt_slim_folders(tiny_pipe, tmp_path):
    unet = tiny_pipe.unet
    plan = _halved_plan(unet)
    apply_plan_shapes(unet, plan)
    save_slim(unet, plan, tmp_path / "ok")
    weights = tmp_path / "ok" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SlimDiffError, match="corrupt slim folder"):
        load_slim(tmp_path / "ok")
    (tmp_path / "ok" / "slimdiff_plan.json").write_text(json.dumps({"format": "nope"}))
    with pytest.raises(SlimDiffError, match="format"):
        load_slim(tmp_path / "ok")
    with pytest.raises(SlimDiffError, match="not a slim model folder"):
        load_slim(tmp_path)


def test_plan_for_another_architecture_is_refused(tiny_pipe):
    plan = _halved_plan(tiny_pipe.unet)
    entry = next(iter(plan.modules))
    bad = RankPlan({**plan.modules, entry: plan.modules[entry].__class__(**{**plan.modules[entry].__dict__, "width": 999})})
    with pytest.raises(SlimDiffError, match="does not match"):
        apply_plan_shapes(tiny_pipe.unet, bad)
