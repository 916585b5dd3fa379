"""PixArt on the adapter layer: what its calibration must see differently from a UNet's — the T5 padding masked
out of every cross-attention, the adaLN gates on the updates, a context projected inside the denoiser — checked
against hooks of the tests' own on a tiny seeded PixArt-Σ pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from slimdiff.calibrate import CalibrationConfig, calibrate, statistics_bytes
from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for, module_sites
from slimdiff.families.blocks import BasicTransformerBlockAdapter
from slimdiff.models import build_builtin

PROMPTS = ["a red circle", "two blue squares on a long green line"]
CONFIG = CalibrationConfig(steps=3, pass1_prompts=1)


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).double()


@pytest.fixture(scope="module")
def observed():
    """A calibration of builtin:tiny-pixart and, from hooks of the test's own on the same run, the sums it should
    hold: per block, the moment of the context tokens the mask keeps, the energies of the residual updates
    (the stream after minus before each gated sub-layer) and the head outputs."""
    pipe = build_builtin("builtin:tiny-pixart")
    transformer = pipe.transformer
    seen: dict[str, torch.Tensor] = {}

    def add(key, value):
        seen[key] = seen.get(key, 0) + value

    handles, stream = [], {}
    for i, block in enumerate(transformer.transformer_blocks):
        path = f"transformer_blocks.{i}"

        def block_in(_m, args, kwargs, path=path):
            stream[path] = args[0]

        def attn2_in(_m, args, kwargs, path=path):
            add(f"{path}.attn1.update", (_f64(args[0]) - _f64(stream[path])).pow(2).sum())
            keep = kwargs["attention_mask"][:, 0] > -1  # PixArt passes the T5 padding as an additive bias
            ctx = kwargs["encoder_hidden_states"][keep].double()
            add(f"{path}.attn2.ctx", ctx.T @ ctx)
            add(f"{path}.attn2.ctx_tokens", float(keep.sum()))

        def ffn_in(_m, args, path=path):
            stream[path + ".ffn"] = args[0]

        def block_out(_m, _args, _kwargs, out, path=path):
            add(f"{path}.ff.update", (_f64(out) - _f64(stream[path + ".ffn"])).pow(2).sum())

        def z_in(_m, args, path=path, attn=block.attn2):
            z = _f64(args[0]) - attn.to_v.bias.double()  # the head outputs less the value bias
            z = z.reshape(len(z), attn.heads, -1)
            add(f"{path}.attn2.z_less_bias", torch.einsum("nhd,nhe->hde", z, z))

        handles += [block.register_forward_pre_hook(block_in, with_kwargs=True),
                    block.attn2.register_forward_pre_hook(attn2_in, with_kwargs=True),
                    block.norm2.register_forward_pre_hook(ffn_in),
                    block.register_forward_hook(block_out, with_kwargs=True),
                    block.attn2.to_out[0].register_forward_pre_hook(z_in)]
    # Pass 2 runs over every prompt; pass 1 (one prompt) runs first, so the test's sums keep only pass 2's.
    calls = []

    def loop(prompts, seeds):
        seen.clear()
        calls.append(len(prompts))
        family_for(pipe).calibration_loop(pipe, CONFIG)(prompts, seeds)

    two_pass = CalibrationConfig(steps=3, pass1_prompts=len(PROMPTS), batch_size=len(PROMPTS))
    stats = calibrate(transformer, PROMPTS, None, two_pass, loop=loop, progress=False)
    for h in handles:
        h.remove()
    assert calls == [len(PROMPTS), len(PROMPTS)]
    return pipe, stats, seen


def test_the_family_serves_the_pipeline_and_its_transformer():
    pipe = build_builtin("builtin:tiny-pixart")
    assert family_for(pipe).name == family_for(pipe.transformer).name == "pixart"
    assert family_for(pipe).denoiser(pipe) is pipe.transformer
    kinds = {(s.kind, s.attention) for s in module_sites(pipe.transformer)}
    assert kinds == {("ffn", None), ("qk", "self"), ("vo", "self"), ("qk", "cross"), ("vo", "cross")}


def test_text_padding_is_left_out_of_the_cross_attention_statistics(observed):
    _, stats, seen = observed
    for i in range(2):
        path = f"transformer_blocks.{i}.attn2"
        attn = stats.attention(path)
        assert float(attn.grams.context_tokens) == seen[f"{path}.ctx_tokens"] < attn.context_seq * 2 * len(PROMPTS) * 3
        torch.testing.assert_close(attn.context, seen[f"{path}.ctx"], rtol=1e-10, atol=0)


def test_update_energies_are_those_of_the_gated_outputs(observed):
    _, stats, seen = observed
    for i in range(2):
        for sub in ("attn1", "ff"):
            path = f"transformer_blocks.{i}.{sub}"
            energies = stats.ffn(path).residual if sub == "ff" else stats.attention(path).residual
            # the test's differences of the float32 stream agree to its rounding
            torch.testing.assert_close(energies.upd_energy.sum(), seen[f"{path}.update"], rtol=1e-5, atol=0)


def test_head_output_grams_less_the_value_bias(observed):
    pipe, stats, seen = observed
    for i, block in enumerate(pipe.transformer.transformer_blocks):
        path = f"transformer_blocks.{i}.attn2"
        grams = stats.attention(path).grams
        less = grams.output_grams_less(block.attn2.to_v.bias.double())
        summed = torch.einsum("t,thde->hde", grams.z_tokens, less)
        torch.testing.assert_close(summed, seen[f"{path}.z_less_bias"], rtol=1e-8, atol=1e-8)


def test_statistics_size_counts_one_text_moment_per_cross_attention(observed):
    pipe, stats, _ = observed
    held = sum(t.numel() * t.element_size() for k, t in stats.tensors.items()
               if not k.startswith("pass1.") and k.endswith((".q_gram", ".k_gram", ".z_gram", "_moment", ".ctx",
                                                             ".moment")))
    assert not [k for k in stats.tensors if k.startswith("text_context")]
    assert sum(statistics_bytes(pipe.transformer, len(stats.timesteps)).values()) == held


@pytest.mark.parametrize("norm_type", ["ada_norm_zero", "ada_norm"])
def test_block_norm_types_whose_data_flow_differs_are_refused(norm_type):
    block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=16, norm_type=norm_type, num_embeds_ada_norm=10)
    with pytest.raises(SlimDiffError, match=f"norm_type='{norm_type}' is not supported"):
        BasicTransformerBlockAdapter().sites("blocks.0", block)


def test_the_slim_command_slims_a_pixart_pipeline_and_its_folder_reopens_it(tmp_path, capsys):
    from slimdiff.cli import main
    from slimdiff.models import load_pipeline
    from slimdiff.slim_models import SlimPixArtTransformer2DModel

    out = tmp_path / "slim"
    assert main(["slim", "--model", "builtin:tiny-pixart", "--num-prompts", "3", "--pass1-prompts", "1",
                 "--steps", "2", "--budget", "0.3", "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "transformer_blocks.1.attn2.qk" in table and "transformer_blocks.0.ff" in table
    pipe = load_pipeline(str(out))
    assert isinstance(pipe.transformer, SlimPixArtTransformer2DModel)
    assert pipe.transformer.slim_plan.params_removed > 0
