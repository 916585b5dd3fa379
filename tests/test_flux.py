"""FLUX: its two block adapters (double-stream MMDiT blocks; single-stream blocks whose V·O and FFN sites share
``proj_out`` by column blocks), the slim FLUX attention processor, calibration's statistics against the test's own
hooks, the family (the pipeline's call, calibration loop, image sizes), the built-ins, local folders and the slim
class."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from call_recording import keyword_calls
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from slimdiff.errors import SlimDiffError
from slimdiff.families import FFN, VO, assemble_column_blocks, block_adapter, family_for
from slimdiff.families.base import ColumnBlock, column_block_key
from slimdiff.families.flux_blocks import SlimFluxAttnProcessor
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.rebuild import resize_site

DIM, HEADS, MLP = 32, 2, 128
PROMPTS = ["a red cube on a table", "two blue spheres", "a green pyramid at night"]


def _randomised(block):
    with torch.no_grad():  # adaLN-Zero starts at zero: random weights everywhere so that every path matters
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return block.eval()


def _double(seed: int = 0) -> FluxTransformerBlock:
    torch.manual_seed(seed)
    return _randomised(FluxTransformerBlock(DIM, HEADS, DIM // HEADS))


def _single(seed: int = 0) -> FluxSingleTransformerBlock:
    torch.manual_seed(seed)
    return _randomised(FluxSingleTransformerBlock(DIM, HEADS, DIM // HEADS))


def _rotary(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.randn(tokens, 3, generator=torch.Generator().manual_seed(3)) * 4
    return FluxPosEmbed(10000, [4, 6, 6])(ids)


def _inputs(seed: int = 1, image: int = 12, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, image, DIM, generator=g),
            "encoder_hidden_states": torch.randn(2, text, DIM, generator=g), "temb": torch.randn(2, DIM, generator=g),
            "image_rotary_emb": _rotary(image + text)}


def _outputs(block, inputs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(block(**inputs), 1)


def _holder(block) -> torch.nn.Module:
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([block])
    return model


# --- the blocks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_double, _single])
def test_the_slim_processor_computes_what_diffusers_computes(make):
    block = make()
    assert isinstance(block.attn.processor, FluxAttnProcessor)
    inputs = _inputs()
    reference = _outputs(block, inputs)
    block.attn.set_processor(SlimFluxAttnProcessor())
    torch.testing.assert_close(_outputs(block, inputs), reference, rtol=1e-5, atol=1e-5)


def test_sites_of_the_flux_blocks():
    double, single = _double(), _single()
    sites = {s.name: s for s in block_adapter(double).sites("b", double)}
    # rotary embeddings and RMS norms act between the Q·K factors: V·O and the two feed-forwards only
    assert list(sites) == ["b.attn.vo", "b.ff", "b.ff_context"]
    vo = sites["b.attn.vo"]
    assert (vo.kind, vo.width, vo.heads) == (VO, DIM // HEADS, HEADS)
    # per head and unit of rank: a row (weights + bias) of each stream's v, a column of each stream's output projection
    assert vo.unit_params == HEADS * (2 * (DIM + 1) + 2 * DIM)
    assert sites["b.ff_context"].kind == FFN and sites["b.ff_context"].width == 4 * DIM

    adapter = block_adapter(single)
    sites = {s.name: s for s in adapter.sites("b", single)}
    assert list(sites) == ["b.attn.vo", "b.proj_mlp"]
    # V·O: a row of to_v and a column of proj_out per head; FFN: a row of proj_mlp and a column of proj_out (the
    # shared bias is no one's unit)
    assert sites["b.attn.vo"].unit_params == HEADS * ((DIM + 1) + DIM)
    assert (sites["b.proj_mlp"].kind, sites["b.proj_mlp"].width, sites["b.proj_mlp"].unit_params) == (
        FFN, MLP, (DIM + 1) + DIM)
    assert adapter.column_blocks(single) == {"proj_out": (DIM, MLP)}

    fused = _single()
    fused.attn.fuse_projections()
    with pytest.raises(SlimDiffError, match="fused q/k/v projections"):
        adapter.sites("b", fused)


def test_the_single_blocks_proj_out_is_two_column_blocks():
    block = _single()
    adapter = block_adapter(block)
    vo, ffn = adapter.sites("b", block)
    attention, mlp = adapter.linears(block, vo), adapter.linears(block, ffn)
    assert isinstance(attention.out, ColumnBlock) and isinstance(mlp.down, ColumnBlock)
    weight = block.proj_out.weight
    assert torch.equal(attention.out.weight, weight[:, :DIM]) and torch.equal(mlp.down.weight, weight[:, DIM:])
    assert attention.out.bias is block.proj_out.bias and mlp.down.bias is None  # the bias is counted once
    assert (attention.out.in_features, mlp.down.in_features, mlp.down.out_features) == (DIM, MLP, DIM)
    # the two blocks' parts of the output add up to proj_out's
    x = torch.randn(3, DIM + MLP)
    torch.testing.assert_close(attention.out(x) + mlp.down(x), block.proj_out(x))
    # each site's new columns travel under a key of their own; the V·O site's carries the bias
    assert set(attention.parameters_at("out", attention.out.weight, attention.out.bias)) == {
        column_block_key("proj_out", 0), "proj_out.bias"}
    assert set(mlp.parameters_at("down", mlp.down.weight, None)) == {column_block_key("proj_out", 1)}

    # assembled into one weight: the blocks given, the current columns for the others
    model = _holder(block)
    a, b = torch.randn(DIM, DIM), torch.randn(DIM, MLP)
    both = assemble_column_blocks(model, {"blocks.0.proj_out.weight[columns 0]": a,
                                          "blocks.0.proj_out.weight[columns 1]": b, "x": a})
    assert set(both) == {"blocks.0.proj_out.weight", "x"} and torch.equal(both["blocks.0.proj_out.weight"],
                                                                          torch.cat([a, b], 1))
    one = assemble_column_blocks(model, {"blocks.0.proj_out.weight[columns 1]": b})
    assert torch.equal(one["blocks.0.proj_out.weight"], torch.cat([weight[:, :DIM].detach(), b], 1))
    with pytest.raises(SlimDiffError, match="column block 1 of blocks.0.proj_out has shape"):
        assemble_column_blocks(model, {"blocks.0.proj_out.weight[columns 1]": b[:, :5]})
    with pytest.raises(SlimDiffError, match="no block shares by columns"):
        assemble_column_blocks(model, {"blocks.0.proj_mlp.weight[columns 1]": b})


@pytest.mark.parametrize("order", [("vo", "ffn"), ("ffn", "vo")])
def test_resizing_one_site_keeps_the_other_site_s_columns_of_proj_out(order):
    block = _single()
    original = copy.deepcopy(block.proj_out)
    model = _holder(block)
    sites = dict(zip(("vo", "ffn"), block_adapter(block).sites("blocks.0", block)))
    ranks = {"vo": 5, "ffn": 40}
    widths = {"vo": DIM, "ffn": MLP}
    for name in order:
        resize_site(model, sites[name], ranks[name])
        widths[name] = HEADS * ranks[name] if name == "vo" else ranks[name]
        proj_out = block.proj_out
        assert proj_out.in_features == widths["vo"] + widths["ffn"]
        other = "ffn" if name == "vo" else "vo"
        if widths[other] == (DIM if other == "vo" else MLP):  # the other site is still at full width
            kept = proj_out.weight[:, widths["vo"]:] if other == "ffn" else proj_out.weight[:, :DIM]
            assert torch.equal(kept, original.weight[:, DIM:] if other == "ffn" else original.weight[:, :DIM])
        assert torch.equal(proj_out.bias, original.bias)
    assert block.attn.to_v.out_features == HEADS * 5 and block.proj_mlp.out_features == 40
    assert isinstance(block.attn.processor, SlimFluxAttnProcessor)
    assert block.proj_out._tp_packed_row_blocks == [HEADS * 5, 40]  # diffusers' tensor-parallel plan follows
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    inputs = _inputs()
    assert _outputs(block, inputs).shape == (2, 17, DIM)
    assert {s.width for s in block_adapter(block).sites("b", block)} == {5, 40}


# --- the family and the built-ins ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    return build_builtin("builtin:tiny-flux")


def _image(pipe, prompt=PROMPTS[0], **kwargs):
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def test_tiny_flux_is_a_flux_pipeline_and_draws_an_image(flux):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    assert isinstance(flux, FluxPipeline) and isinstance(flux.transformer, FluxTransformer2DModel)
    cfg = flux.transformer.config
    assert (cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds) == (2, 2, True)
    assert flux.vae.config.latent_channels * 4 == cfg.in_channels and flux.vae_scale_factor == 2
    image = _image(flux)
    assert image.shape == (1, 32, 32, 3) and image.std() > 0


def test_the_family_knows_the_pipelines_transformer_call(flux):
    family = family_for(flux)
    assert family.name == "flux" and family_for(flux.transformer) is family
    assert family.denoiser(flux) is flux.transformer
    calls = keyword_calls(flux.transformer, lambda: _image(flux))
    assert len(calls) == 2  # one call per step: guidance is embedded, not a batch
    call = calls[0]
    # the timestep is the sigma; calibration indexes by the scheduler's timestep, sigma × 1000
    assert 0 < float(calls[1]["timestep"][0]) < float(call["timestep"][0]) <= 1
    assert [float(family.timestep((), c)[0]) for c in calls] == [round(float(t)) for t in flux.scheduler.timesteps]
    assert call["guidance"].tolist() == [3.5]  # FluxPipeline's default guidance, embedded
    assert call["encoder_hidden_states"].shape == (1, family.text_tokens, 96) and family.text_tokens == 512
    # the dummy call has the pipeline's keys, shapes, dtypes and position ids, and runs the transformer
    dummy = family.dummy_call(flux.transformer.config, 1, (16, 16))
    tensors = {k: v for k, v in call.items() if torch.is_tensor(v)}
    assert {k: (v.shape, v.dtype) for k, v in dummy.items()} == {k: (v.shape, v.dtype) for k, v in tensors.items()}
    assert torch.equal(dummy["img_ids"], call["img_ids"]) and torch.equal(dummy["txt_ids"], call["txt_ids"])
    assert flux.transformer(**dummy).sample.shape == (1, 64, 64)
    with torch.device("meta"):
        meta = family.build({**flux.transformer.config, "guidance_embeds": False})  # FLUX.1-schnell: no guidance
    schnell = family.dummy_call(meta.config, 1, (8, 24), 20, device="meta")
    assert "guidance" not in schnell and meta(**schnell).sample.shape == (1, 4 * 12, 64)
    with pytest.raises(SlimDiffError, match="does not pack into 2×2 patches"):
        family.dummy_call(meta.config, 1, (8, 9))
    assert [t.encoder for t in family.text_towers(flux)] == [flux.text_encoder, flux.text_encoder_2]


def test_the_calibration_loop_runs_the_pipeline_on_seeded_packed_latents(flux):
    from slimdiff.calibrate import CalibrationConfig

    config = CalibrationConfig(steps=3, height=32, width=32)
    loop = family_for(flux).calibration_loop(flux, config)
    calls = keyword_calls(flux.transformer, lambda: loop(PROMPTS[:2], [5, 9]))
    assert len(calls) == 3
    seeded = torch.randn((1, 64, 64), generator=torch.Generator().manual_seed(9))
    assert calls[0]["hidden_states"].shape == (2, 64, 64) and torch.equal(calls[0]["hidden_states"][1], seeded[0])
    # seeded per prompt: a prompt's trajectory does not depend on its batch
    alone = keyword_calls(flux.transformer, lambda: loop(PROMPTS[1:2], [9]))
    torch.testing.assert_close(alone[-1]["hidden_states"][0], calls[-1]["hidden_states"][1], atol=1e-5, rtol=0)
    guided = keyword_calls(flux.transformer, lambda: family_for(flux).calibration_loop(
        flux, CalibrationConfig(steps=1, height=32, width=32, guidance_scale=5.0))(PROMPTS[:1], [1]))
    assert guided[0]["guidance"].tolist() == [5.0]
    # FLUX.1-schnell's layout: no guidance embedding, and the pipeline passes none
    from diffusers import FluxTransformer2DModel

    from slimdiff.models import _seeded

    schnell = type(flux)(**{**flux.components, "transformer": _seeded(0, lambda: FluxTransformer2DModel(
        **{**flux.transformer.config, "guidance_embeds": False})).eval()})
    schnell.set_progress_bar_config(disable=True)
    calls = keyword_calls(schnell.transformer, lambda: family_for(schnell).calibration_loop(schnell, config)(PROMPTS[:1], [1]))
    assert len(calls) == 3 and calls[0]["guidance"] is None


def test_an_image_size_the_pipeline_cannot_pack_is_refused_before_calibration(flux, tmp_path, capsys):
    from slimdiff.calibrate import CalibrationConfig, pipeline_loop
    from slimdiff.cli import main

    with pytest.raises(SlimDiffError, match=r"image width 34 px: FluxPipeline takes positive multiples of 4 px"):
        pipeline_loop(flux, CalibrationConfig(height=32, width=34))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    assert main(["calibrate", "--model", "builtin:tiny-flux", "--prompts", str(tmp_path / "prompts.txt"),
                 "--num-prompts", "2", "--pass1-prompts", "1", "--steps", "2", "--resolution", "30",
                 "--out", str(tmp_path / "stats")]) == 2
    assert "image height 30 px" in capsys.readouterr().err and not (tmp_path / "stats").exists()


def test_flux_dev_shape_has_the_published_geometry_on_the_meta_device():
    from slimdiff.bench.macs import denoiser_class, meta_unet
    from slimdiff.models import BUILTIN_DENOISER_CONFIGS

    pipe = build_builtin("builtin:flux-dev-shape", device="meta")
    transformer = pipe.transformer
    assert transformer.device.type == "meta"
    # FLUX.1-dev: the 12B transformer; 19 double- and 38 single-stream blocks of 24 heads of 128
    assert 11.8e9 < sum(p.numel() for p in transformer.parameters()) < 12.0e9
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (19, 38)
    assert transformer.inner_dim == 24 * 128 and transformer.x_embedder.in_features == 64
    assert (transformer.context_embedder.in_features, transformer.context_embedder.out_features) == (4096, 3072)
    assert transformer.time_text_embed.text_embedder.linear_1.in_features == 768
    assert hasattr(transformer.time_text_embed, "guidance_embedder")
    assert pipe.text_encoder_2.config.d_model == 4096 and pipe.text_encoder.config.hidden_size == 768
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    config = BUILTIN_DENOISER_CONFIGS["builtin:flux-dev-shape"]
    assert denoiser_class(config) is type(transformer)
    assert sum(p.numel() for p in meta_unet(config).parameters()) == sum(p.numel() for p in transformer.parameters())


def test_a_flux_pipeline_folder_loads_and_an_incomplete_one_is_one_line(flux, tmp_path):
    folder = tmp_path / "pipe"
    flux.save_pretrained(folder, safe_serialization=True)
    loaded = load_pipeline(str(folder))
    assert type(loaded) is type(flux) and not loaded.transformer.training
    saved, back = flux.transformer.state_dict(), loaded.transformer.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(SlimDiffError, match=r"FluxPipeline folder without text_encoder_2 ") as err:
        load_pipeline(str(folder))
    assert "\n" not in str(err.value)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "transformer": [None, None]}))
    with pytest.raises(SlimDiffError, match="without transformer, text_encoder_2 "):
        load_pipeline(str(folder))


@pytest.mark.parametrize("cls_name", ["FluxImg2ImgPipeline", "FluxControlInpaintPipeline"])
def test_other_flux_pipeline_folders(flux, cls_name, tmp_path):
    folder = tmp_path / "pipe"
    flux.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": cls_name}))
    if cls_name == "FluxImg2ImgPipeline":  # the same components: loads as the text-to-image pipeline
        assert type(load_pipeline(str(folder))) is type(flux)
        return
    with pytest.raises(SlimDiffError, match=f"is a {cls_name} folder; slimdiff calibrates FLUX through its "
                                            "text-to-image, Fill, Control, Kontext and ControlNet pipelines"):
        load_pipeline(str(folder))


def test_the_slim_flux_class_is_registered_and_needs_a_plan():
    from diffusers import FluxTransformer2DModel

    import slimdiff
    from slimdiff.configs import TINY_FLUX_TRANSFORMER
    from slimdiff.slim_models import SLIM_CLASSES, SlimFluxTransformer2DModel

    assert slimdiff.SlimFluxTransformer2DModel is SlimFluxTransformer2DModel
    assert SLIM_CLASSES["SlimFluxTransformer2DModel"] is SlimFluxTransformer2DModel
    assert SlimFluxTransformer2DModel.dense_class is FluxTransformer2DModel
    with pytest.raises(SlimDiffError, match="SlimFluxTransformer2DModel needs a rank_plan"):
        SlimFluxTransformer2DModel.from_config(dict(TINY_FLUX_TRANSFORMER))


# --- calibration of the whole transformer (builtin:tiny-flux) ----------------------------------------------------


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).double()


def _head_gram(y: torch.Tensor, heads: int) -> torch.Tensor:
    y = _f64(y).reshape(-1, heads, y.shape[-1] // heads)
    return torch.einsum("nhd,nhe->hde", y, y)


@pytest.fixture(scope="module")
def observed(flux):
    """A calibration of builtin:tiny-flux and, from hooks of the test's own on the same run (pass 2's sums), what it
    should hold per block: double-stream blocks — the head outputs of both streams, both streams' updates (stream after minus before each gated
    sub-layer); single-stream blocks — the attention's head outputs, the MLP activation's energy and each site's
    gated part of proj_out's output (the two add up to the block's update); the token counts."""
    from slimdiff.calibrate import CalibrationConfig, calibrate

    transformer = flux.transformer
    seen: dict = {}

    def add(key, value):
        seen[key] = seen.get(key, 0) + value

    handles, stream = [], {}
    for i, block in enumerate(transformer.transformer_blocks):
        path, attn = f"transformer_blocks.{i}", block.attn

        def block_in(_m, args, kwargs, path=path):
            stream[path] = (kwargs["hidden_states"], kwargs["encoder_hidden_states"])

        def attn_in(_m, args, kwargs, path=path):
            seen[f"{path}.tokens"] = (kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1])

        def norm2_in(_m, args, path=path, which=0, name="ff"):
            add(f"{path}.attn.update", (_f64(args[0]) - _f64(stream[path][which])).pow(2).sum())
            stream[f"{path}.{name}"] = args[0]

        def block_out(_m, _args, _kwargs, out, path=path):
            context, image = out
            add(f"{path}.ff.update", (_f64(image) - _f64(stream[path + ".ff"])).pow(2).sum())
            add(f"{path}.ff_context.update", (_f64(context) - _f64(stream[path + ".ff_context"])).pow(2).sum())

        def z_in(_m, args, path=path, heads=attn.heads):
            add(f"{path}.attn.z_gram", _head_gram(args[0], heads))

        handles += [block.register_forward_pre_hook(block_in, with_kwargs=True),
                    attn.register_forward_pre_hook(attn_in, with_kwargs=True),
                    block.norm2.register_forward_pre_hook(norm2_in),
                    block.norm2_context.register_forward_pre_hook(
                        lambda m, a, path=path: norm2_in(m, a, path, 1, "ff_context")),
                    block.register_forward_hook(block_out, with_kwargs=True),
                    attn.to_out[0].register_forward_pre_hook(z_in), attn.to_add_out.register_forward_pre_hook(z_in)]
    for i, block in enumerate(transformer.single_transformer_blocks):
        path = f"single_transformer_blocks.{i}"

        def single_in(_m, args, kwargs, path=path, block=block):
            residual = torch.cat([kwargs["encoder_hidden_states"], kwargs["hidden_states"]], 1)
            temb = kwargs["temb"]
            stream[path] = (residual, block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)[2][:, None])
            seen[f"{path}.tokens"] = residual.shape[1]

        def attn_out(_m, _args, _kwargs, z, path=path, heads=block.attn.heads):
            add(f"{path}.attn.z_gram", _head_gram(z, heads))
            stream[path + ".z"] = z

        def act_out(_m, _args, h, path=path):
            add(f"{path}.proj_mlp.h_energy", _f64(h).pow(2).sum())
            stream[path + ".h"] = h

        def proj_out_out(_m, _args, out, path=path, block=block):
            # proj_out(cat([z, h])): each site's gated part; together they are the block's whole update
            gate, w, b = stream[path][1], block.proj_out.weight, block.proj_out.bias
            z, h, width = stream[path + ".z"], stream[path + ".h"], block.attn.to_v.out_features
            attn_part, mlp_part = gate * (z @ w[:, :width].T + b), gate * (h @ w[:, width:].T)
            torch.testing.assert_close(attn_part + mlp_part, gate * out, rtol=1e-5, atol=1e-5)
            add(f"{path}.attn.update", _f64(attn_part).pow(2).sum())
            add(f"{path}.proj_mlp.update", _f64(mlp_part).pow(2).sum())

        handles += [block.register_forward_pre_hook(single_in, with_kwargs=True),
                    block.attn.register_forward_hook(attn_out, with_kwargs=True),
                    block.act_mlp.register_forward_hook(act_out), block.proj_out.register_forward_hook(proj_out_out)]
    config = CalibrationConfig(steps=2, pass1_prompts=1, batch_size=2, height=32, width=32)

    def loop(prompts, seeds):  # pass 1 runs first; the test keeps pass 2's sums
        seen.clear()
        family_for(flux).calibration_loop(flux, config)(prompts, seeds)

    stats = calibrate(transformer, PROMPTS[:2], None, config, loop=loop, progress=False)
    for h in handles:
        h.remove()
    return stats, seen


def test_double_stream_statistics_span_both_streams(flux, observed):
    from slimdiff.families.base import seq_key

    stats, seen = observed
    for i, block in enumerate(flux.transformer.transformer_blocks):
        path = f"transformer_blocks.{i}"
        attn = stats.attention(f"{path}.attn")
        image, text = seen[f"{path}.tokens"]
        assert (image, text) == (64, 512) and attn.seq == attn.key_tokens == image + text
        assert int(stats.tensors[seq_key(f"{path}.ff")]) == image
        assert int(stats.tensors[seq_key(f"{path}.ff_context")]) == text
        torch.testing.assert_close(attn.grams.z_gram.sum(0), seen[f"{path}.attn.z_gram"], rtol=1e-8, atol=1e-8)
        # no Q·K site: neither the Q·K moment nor the query and key Grams only its TRQ reads are collected
        assert attn.qk_moment is None and attn.grams.q_gram is None and attn.grams.k_gram is None
        for sub in ("attn", "ff", "ff_context"):
            energies = attn.residual if sub == "attn" else stats.ffn(f"{path}.{sub}").residual
            torch.testing.assert_close(energies.upd_energy.sum(), seen[f"{path}.{sub}.update"], rtol=1e-5, atol=0)


def test_single_stream_statistics_split_the_shared_projection(flux, observed):
    from slimdiff.families.base import seq_key

    stats, seen = observed
    for i, block in enumerate(flux.transformer.single_transformer_blocks):
        path = f"single_transformer_blocks.{i}"
        tokens = seen[f"{path}.tokens"]
        attn, ffn = stats.attention(f"{path}.attn"), stats.ffn(f"{path}.proj_mlp")
        assert tokens == 64 + 512 and attn.seq == tokens and int(stats.tensors[seq_key(f"{path}.proj_mlp")]) == tokens
        # the head outputs are proj_out's first columns, the MLP activation its others
        torch.testing.assert_close(attn.grams.z_gram.sum(0), seen[f"{path}.attn.z_gram"], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(ffn.h_energy.sum(), seen[f"{path}.proj_mlp.h_energy"], rtol=1e-8, atol=0)
        assert ffn.moment.shape == (MLP, MLP) and attn.vo_moment.shape == (DIM, DIM)
        # each site's update is its gated part of proj_out's output (the parts add up to the block's update)
        for sub in ("attn", "proj_mlp"):
            energies = (attn if sub == "attn" else ffn).residual
            torch.testing.assert_close(energies.upd_energy.sum(), seen[f"{path}.{sub}.update"], rtol=1e-5, atol=0)


def test_slimming_narrows_both_column_blocks_of_proj_out(flux, observed):
    from slimdiff.families import module_sites
    from slimdiff.slim import SlimConfig, apply_ranks

    stats, _ = observed
    dense = flux.transformer
    call = family_for(dense).dummy_call(dense.config, 2, (16, 16), 20)
    g = torch.Generator().manual_seed(3)
    call = {k: torch.randn(v.shape, generator=g) if k in ("hidden_states", "encoder_hidden_states",
                                                          "pooled_projections") else v for k, v in call.items()}
    call = {**call, "timestep": torch.full((2,), 0.5), "guidance": torch.full((2,), 3.5)}
    with torch.no_grad():
        reference = dense(**call).sample
    block = "single_transformer_blocks.0"
    original = dense.get_submodule(f"{block}.proj_out")
    errors = []
    for ranks in ({f"{block}.attn.vo": 8}, {f"{block}.proj_mlp": 64}, {f"{block}.attn.vo": 8, f"{block}.proj_mlp": 64}):
        model = copy.deepcopy(dense)
        full = {s.name: s.width for s in module_sites(model)}
        report = apply_ranks(model, stats, {**full, **ranks}, SlimConfig(), progress=False)
        proj_out = model.get_submodule(f"{block}.proj_out")
        attention_cols = HEADS * ranks.get(f"{block}.attn.vo", DIM // HEADS)
        assert proj_out.in_features == attention_cols + ranks.get(f"{block}.proj_mlp", MLP)
        if f"{block}.attn.vo" not in ranks:  # the V·O site kept its columns and the bias
            assert torch.equal(proj_out.weight[:, :DIM], original.weight[:, :DIM])
            assert torch.equal(proj_out.bias, original.bias)
        if f"{block}.proj_mlp" not in ranks:
            assert torch.equal(proj_out.weight[:, attention_cols:], original.weight[:, DIM:])
        assert sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in model.parameters()) == \
            report.plan.params_removed > 0
        with torch.no_grad():
            out = model(**call).sample
        errors.append(float((out - reference).norm() / reference.norm()))
    assert 0 < max(errors[:2]) < errors[2] < 0.5


def test_the_mac_arithmetic_of_flux_blocks_and_their_site_geometry():
    # tiny-flux at a 16² latent (64 packed image tokens) and 20 text tokens: every block, double- or single-stream,
    # costs 12·d²·N + 2·N²·d MACs per sample (N = 84 joint tokens): q, k, v, output projections (4·d²·N) and the MLPs
    # (8·d²·N) — in a single-stream block proj_out's 5·d²·N hold the attention's output projection and half the MLP
    from slimdiff.bench.macs import count_macs, meta_unet
    from slimdiff.bench.plans import transformer_mac_plan
    from slimdiff.latency import site_geometry
    from slimdiff.models import BUILTIN_DENOISER_CONFIGS

    model = meta_unet(BUILTIN_DENOISER_CONFIGS["builtin:tiny-flux"])
    d, image, text = DIM, 64, 20
    n = image + text
    macs = count_macs(model, 1, (16, 16), text)
    proj_out = 2 * 5 * d * d * n  # two single-stream blocks: counted outside the sites' sub-layer modules
    assert macs.ffn + macs.attn1_proj + macs.attn1_products + proj_out == 4 * (12 * d * d * n + 2 * n * n * d)
    assert macs.attn1_products == 4 * 2 * n * n * d and macs.attn2_proj == macs.attn2_products == 0
    geometry = site_geometry(model, (16, 16), text)
    assert geometry["transformer_blocks.0.ff"].tokens == image
    assert geometry["transformer_blocks.0.ff_context"].tokens == text
    assert geometry["single_transformer_blocks.0.proj_mlp"].tokens == n
    assert geometry["single_transformer_blocks.0.attn.vo"].tokens == n
    assert geometry["transformer_blocks.1.attn.vo"].tokens == n
    plan = transformer_mac_plan(model, 0.4, (16, 16), text)
    assert plan.modules["single_transformer_blocks.1.proj_mlp"].rank < MLP


def test_the_family_declares_the_transformer_export(flux):
    # The exported call takes the latent unpacked and packs it and builds the positions in the graph; its rotary
    # table is float32 (TensorRT has no float64), where diffusers computes the angles in float64.
    from diffusers import FluxPipeline
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from slimdiff.export.modules import denoiser_component
    from slimdiff.export.shapes import default_flags
    from slimdiff.families.flux import latent_ids, pack_latents, rotary_table, unpack_latents

    transformer = flux.transformer
    component = denoiser_component(transformer)
    assert component.name == "transformer" and component.attention_modules == 4
    assert [(s.name, s.dims, s.dtype) for s in component.inputs] == [
        ("hidden_states", ("batch", 16, "height", "width"), "model"), ("timestep", ("batch",), "float32"),
        ("encoder_hidden_states", ("batch", "text_len", 96), "model"), ("pooled_projections", ("batch", 64), "model"),
        ("guidance", ("batch",), "float32")]
    schnell = family_for(flux).export_inputs({**transformer.config, "guidance_embeds": False})
    assert [s.name for s in schnell] == ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"]
    assert family_for(flux).latent_multiple(transformer.config) == 2
    # FLUX's transformer has no sample_size: the export's default sizes come from the pipeline's
    assert default_flags(transformer.config, 2, native=16)["height"] == "16:32:48"
    with pytest.raises(SlimDiffError, match="no native image size .* give both"):
        default_flags(transformer.config, 2)
    # a bare transformer folder (a slim one) exports at the sizes given: only the other axes take defaults
    assert default_flags(transformer.config, 2, sizes_given=True) == {"batch": "1:2:4", "text_len": "77:77:154"}

    x, sigma, text, pooled, guidance = component.random_inputs(
        {"batch": 2, "height": 16, "width": 24, "text_len": 20}, torch.float32, seed=1)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 16, 24))
    assert torch.equal(unpack_latents(packed, 16, 24), x)
    call = dict(hidden_states=packed, timestep=sigma, encoder_hidden_states=text, pooled_projections=pooled,
                img_ids=latent_ids(8, 12), txt_ids=torch.zeros(20, 3), guidance=guidance, return_dict=False)
    with torch.no_grad():
        ref = unpack_latents(transformer(**call)[0], 16, 24)
        got = component.module(x, sigma, text, pooled, guidance)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert not torch.allclose(component.module(x, sigma, text, pooled, guidance.flip(0)), ref, atol=1e-3)
    assert type(transformer.pos_embed) is FluxPosEmbed  # swapped for the exported call only

    # FLUX.1's rotary axes at 2048 px (128² packed tokens and 512 text tokens): float32 angles stay within 1e-5
    ids = torch.cat([torch.zeros(512, 3), latent_ids(128, 128)])
    table = rotary_table(ids, (16, 56, 56), 10000)
    for ours, theirs in zip(table, FluxPosEmbed(10000, [16, 56, 56])(ids)):
        assert ours.dtype == torch.float32 and (ours - theirs).abs().max() < 1e-5


def test_the_engine_takes_only_the_positions_its_graph_builds():
    from slimdiff.families.flux import latent_ids
    from slimdiff.families.flux import packed_grids

    def grid(*args):  # the text-to-image call's one grid
        [latent] = packed_grids(*args)
        return latent

    assert grid(latent_ids(8, 12), torch.zeros(20, 3), 96, 20) == (8, 12)
    assert grid(latent_ids(8, 12)[None], torch.zeros(1, 20, 3), 96, 20) == (8, 12)  # diffusers' deprecated 3-D ids
    for img_ids, txt_ids in ((latent_ids(8, 12) + torch.tensor([1.0, 0, 0]), torch.zeros(20, 3)),  # FLUX Kontext's
                             (latent_ids(8, 12).flip(0), torch.zeros(20, 3)),  # not row-major
                             (latent_ids(8, 12), torch.ones(20, 3)), (latent_ids(8, 12), torch.zeros(21, 3)),
                             (latent_ids(8, 11), torch.zeros(20, 3))):  # fewer positions than tokens
        with pytest.raises(SlimDiffError, match="take the text-to-image pipeline's positions"):
            grid(img_ids, txt_ids, 96, 20)
    # FLUX Kontext's call: the latent's grid, then the reference's (first coordinate 1), of its own size
    kontext = torch.cat([latent_ids(8, 12), latent_ids(4, 6, first=1)])
    with pytest.raises(SlimDiffError, match="take the text-to-image pipeline's positions"):
        grid(kontext, torch.zeros(20, 3), 120, 20)
    assert packed_grids(kontext, torch.zeros(20, 3), 120, 20, reference=True) == [(8, 12), (4, 6)]
    for img_ids in (latent_ids(8, 12), torch.cat([latent_ids(4, 6, first=1), latent_ids(8, 12)])):
        with pytest.raises(SlimDiffError, match="take the FLUX Kontext pipeline's positions"):
            packed_grids(img_ids, torch.zeros(20, 3), len(img_ids), 20, reference=True)


def test_closed_form_errors_of_the_single_stream_sites_equal_the_measured_ones(flux, observed):
    # The two sites sharing proj_out, rebuilt alone in a float64 copy (resize, then load their slim weights: the
    # column-block entries assembled into proj_out) and read back through the column-block views: the error the
    # closed forms report is the error of the rebuilt weights on the calibration moments.
    from slimdiff.decompose import ffn_measured_error, regularise, vo_measured_error
    from slimdiff.families import module_sites, site_linears
    from slimdiff.rebuild import load_slim_weights
    from slimdiff.slim import SlimConfig, analyze_sites, decompose_site

    stats, _ = observed
    dense = flux.transformer
    config = SlimConfig(vo_statistic="value", ridge_vo=1e-9)
    sites = [s for s in module_sites(dense) if s.block == "single_transformer_blocks.1"]
    analyses = analyze_sites(dense, stats, sites)
    as64 = lambda t: t.detach().double()  # noqa: E731
    for site, rank in zip(sites, (8, 48)):
        result = decompose_site(dense, analyses[site.name], rank, config)
        rebuilt = copy.deepcopy(dense).double()
        resize_site(rebuilt, site, rank)
        load_slim_weights(rebuilt, result.tensors)
        lin, new = site_linears(dense, site), site_linears(rebuilt, site)
        inputs = analyses[site.name].read_inputs()
        if site.kind == VO:
            v, o = as64(lin.v.weight), as64(lin.out.weight)
            args = (inputs["sigma_v"], site.heads)
            measured = vo_measured_error(v, o, as64(new.v.weight), as64(new.out.weight), *args)
            total = vo_measured_error(v, o, v[:site.heads] * 0, o[:, :site.heads] * 0, *args)
            assert new.out.in_features == HEADS * rank and new.out.bias is not None
        else:
            keep = torch.tensor([int((as64(lin.proj.weight) == row).all(1).nonzero()[0])
                                 for row in as64(new.proj.weight)])
            moment = regularise(inputs["moment"], config.ridge_ffn)
            down = as64(lin.down.weight)
            measured = ffn_measured_error(down, moment, keep, as64(new.down.weight))
            total = float(torch.einsum("ci,ij,cj->", down, moment, down))
            assert new.down.in_features == rank and new.down.bias is None
        assert 0 < result.relative_error < 1, site.name
        assert abs(measured / total - result.relative_error) < 1e-5 * max(1.0, result.relative_error), site.name
        # the other site's columns of proj_out are untouched
        other = next(s for s in sites if s is not site)
        role = "out" if other.kind == VO else "down"
        assert torch.equal(site_linears(rebuilt, other).modules()[role].weight,
                           as64(site_linears(dense, other).modules()[role].weight))
