"""MAC counting: the flop counter sees attention products on every path, and slim counts follow the plan."""

import torch

from slimdiff.bench.latency_table import site_geometry
from slimdiff.bench.macs import count_macs, meta_unet
from slimdiff.bench.plans import _copy_except_resized, seeded_slim_copy, synthetic_plan
from slimdiff.families import site_linears
from slimdiff.models import FFN, QK, module_sites
from slimdiff.plan import RankPlan

LATENT = (16, 16)


def _expected_reduction(unet, plan, batch):
    """MACs removed per UNet call, from the plan and each site's token counts (bias adds are not MACs)."""
    geo = site_geometry(unet, LATENT)
    total = 0
    for s in module_sites(unet):
        g, cut = geo[s.name], plan.modules[s.name].width - plan.modules[s.name].rank
        if s.kind == FFN:  # GEGLU: content and gate rows (2C), GELU: one row (C); + a down-projection column (C)
            total += cut * ((2 if site_linears(unet, s).gated else 1) + 1) * g.channels * g.tokens
        elif s.kind == QK:  # q and k projections + QKᵀ
            total += s.heads * cut * (g.channels * g.tokens + g.context_dim * g.context_tokens
                                      + g.tokens * g.context_tokens)
        else:  # v and output projections + AV
            total += s.heads * cut * (g.context_dim * g.context_tokens + g.channels * g.tokens
                                      + g.tokens * g.context_tokens)
    return batch * total


def test_slim_macs_are_lower_than_dense_by_exactly_what_the_plan_removes(tiny_pipe):
    unet = tiny_pipe.unet
    plan = synthetic_plan(unet, 0.4)
    dense = count_macs(meta_unet(unet.config), 2, LATENT)
    slim = count_macs(meta_unet(unet.config, plan), 2, LATENT)
    assert slim.total < dense.total
    assert dense.total - slim.total == _expected_reduction(unet, plan, 2)
    assert dense.other == slim.other  # convolutions, time embedding, proj_in/out untouched
    assert dense.params - slim.params == plan.params_removed


def test_cpu_counting_matches_meta_counting_including_sdpa(tiny_pipe):
    unet = tiny_pipe.unet
    dense_on_cpu = count_macs(unet, 1, LATENT)
    assert dense_on_cpu == count_macs(meta_unet(unet.config), 1, LATENT)
    assert dense_on_cpu.attn1_products > 0 and dense_on_cpu.attn2_products > 0
    # q·k width 8 < v width: on the CPU the slim processor zero-pads q and k to the v width, so that SDPA runs its
    # fused kernel (slimdiff.families.blocks.slim_attention) — the products it counts there are the dense ones; the
    # model's own arithmetic is the meta device's count, which the benchmark reports.
    sites = module_sites(unet)
    plan = RankPlan.from_ranks(sites, {s.name: (8 if s.kind == QK else s.width) for s in sites})
    on_cpu = count_macs(seeded_slim_copy(unet, plan), 1, LATENT)
    on_meta = count_macs(meta_unet(unet.config, plan), 1, LATENT)
    assert (on_cpu.ffn, on_cpu.attn1_proj, on_cpu.attn2_proj) == (on_meta.ffn, on_meta.attn1_proj, on_meta.attn2_proj)
    assert (on_cpu.attn1_products, on_cpu.attn2_products) == (dense_on_cpu.attn1_products, dense_on_cpu.attn2_products)
    assert on_meta.attn1_products < on_cpu.attn1_products and on_meta.attn2_products < on_cpu.attn2_products


def test_attention_products_follow_the_token_counts(tiny_pipe):
    unet = tiny_pipe.unet
    geo = site_geometry(unet, LATENT)
    count = count_macs(meta_unet(unet.config), 1, LATENT)
    expected = {"attn1": 0, "attn2": 0}
    for s in module_sites(unet):
        if s.kind != FFN:  # QKᵀ counts q·k width, AV counts v width
            g = geo[s.name]
            expected[s.attn] += s.heads * s.width * g.tokens * g.context_tokens
    assert count.attn1_products == expected["attn1"]
    assert count.attn2_products == expected["attn2"]


def test_seeded_slim_copy_has_plan_shapes_finite_outputs_and_leaves_the_original(tiny_pipe):
    unet = tiny_pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    plan = synthetic_plan(unet, 0.4)
    slim = seeded_slim_copy(unet, plan, seed=3)
    again = seeded_slim_copy(unet, plan, seed=3)
    assert sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in slim.parameters()) == \
        plan.params_removed
    x, e = torch.randn(1, 4, *LATENT), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        out = slim(x, 10, encoder_hidden_states=e).sample
        assert torch.isfinite(out).all()
        assert torch.equal(out, again(x, 10, encoder_hidden_states=e).sample)  # seeded: reproducible
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())



def test_slim_copy_never_copies_the_weights_it_replaces(tiny_pipe):
    # an SDXL UNet is 10 GB in fp32: copying the Linears a plan resizes before replacing them would double it
    unet = tiny_pipe.unet
    plan = synthetic_plan(unet, 0.4)
    module_names = {id(m): n for n, m in unet.named_modules()}
    replaced = {f"{module_names[id(lin)]}.{kind}" for s in module_sites(unet) if plan.modules[s.name].rank < s.width
                for lin in site_linears(unet, s).modules().values() for kind in ("weight", "bias")}
    dense = dict(unet.named_parameters())
    copied = dict(_copy_except_resized(unet, plan).named_parameters())
    assert copied.keys() == dense.keys() and replaced & dense.keys()
    for name, p in copied.items():
        if name in replaced:
            assert p.numel() == 0
        else:
            assert torch.equal(p, dense[name]) and p.data_ptr() != dense[name].data_ptr()


def test_a_dit_is_counted_at_its_own_text_length_and_slims_by_what_the_plan_removes():
    from slimdiff.models import build_builtin

    transformer = build_builtin("builtin:tiny-pixart", device="meta").transformer
    plan = synthetic_plan(transformer, 0.4)
    dense = count_macs(meta_unet(transformer), 2, LATENT)
    slim = count_macs(meta_unet(transformer, plan), 2, LATENT)
    geo = site_geometry(transformer, LATENT)
    assert {g.context_tokens for name, g in geo.items() if ".attn2." in name} == {300}  # PixArt-Σ's T5 length
    assert dense.total - slim.total == _expected_reduction(transformer, plan, 2) > 0
    assert dense.attn2_products > 0 and dense.other == slim.other
