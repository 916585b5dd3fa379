"""Stable Diffusion 3: the tiny built-in and the SD3-medium shapes, its model family (the pipeline's call, calibration
loop and text towers), local SD3 pipeline folders, SlimSet's three towers, the slim SD3 class, and the transformer as
an ONNX Runtime engine in the pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from call_recording import keyword_calls

from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for
from slimdiff.models import build_builtin, load_pipeline

PROMPTS = ["a red cube on a table", "two blue spheres", "a green pyramid at night", "a cat", "a yellow star",
           "three small purple cones under a lamp"]


def _image(pipe, prompt: str = PROMPTS[0], **kwargs):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


@pytest.fixture(scope="module")
def sd3():
    return build_builtin("builtin:tiny-sd3")


# --- the built-ins -----------------------------------------------------------------------------------------------


def test_tiny_sd3_is_an_sd3_pipeline_and_draws_an_image(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.models.attention import JointTransformerBlock
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert isinstance(sd3, StableDiffusion3Pipeline) and isinstance(sd3.transformer, SD3Transformer2DModel)
    assert all(isinstance(e, CLIPTextModelWithProjection) for e in (sd3.text_encoder, sd3.text_encoder_2))
    assert isinstance(sd3.text_encoder_3, T5EncoderModel)
    assert isinstance(sd3.scheduler, FlowMatchEulerDiscreteScheduler) and sd3.scheduler.config.shift == 3.0
    cfg = sd3.transformer.config
    blocks = [m for m in sd3.transformer.modules() if isinstance(m, JointTransformerBlock)]
    assert [b.context_pre_only for b in blocks] == [False] * (cfg.num_layers - 1) + [True]
    assert not any(b.use_dual_attention for b in blocks) and cfg.qk_norm is None
    clip_widths = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    # the pipeline zero-pads the CLIP tokens to the T5 width: as in SD3, the T5 is wider than both CLIPs together
    assert cfg.joint_attention_dim == sd3.text_encoder_3.config.d_model > clip_widths
    assert cfg.pooled_projection_dim == (sd3.text_encoder.config.projection_dim
                                         + sd3.text_encoder_2.config.projection_dim)
    assert cfg.caption_projection_dim == cfg.num_attention_heads * cfg.attention_head_dim
    assert sd3.vae.config.latent_channels == cfg.in_channels == 16
    assert (sd3.vae.config.scaling_factor, sd3.vae.config.shift_factor) == (1.5305, 0.0609)
    assert not any(p.requires_grad for p in sd3.transformer.parameters())

    image = _image(sd3)
    assert image.shape == (1, 32, 32, 3) and image.std() > 0
    assert (image == _image(build_builtin("builtin:tiny-sd3"))).all()  # seeded: the same weights every time
    assert not (image == _image(sd3, PROMPTS[1])).all()  # the prompt reaches the image
    assert not (image == _image(sd3, prompt_3=PROMPTS[1])).all()  # ... through the T5 tower as well


def test_tiny_sd3_builds_on_the_meta_device():
    pipe = build_builtin("builtin:tiny-sd3", device="meta")
    assert pipe.transformer.device.type == "meta" and pipe.text_encoder_3.device.type == "meta"


def test_sd3_medium_shape_has_the_published_geometry_on_the_meta_device():
    from slimdiff.bench.macs import denoiser_class, meta_unet
    from slimdiff.models import BUILTIN_DENOISER_CONFIGS

    pipe = build_builtin("builtin:sd3-medium-shape", device="meta")
    transformer = pipe.transformer
    assert transformer.device.type == "meta"
    # SD3 medium: the "2B" MMDiT; 24 blocks of 24 heads of 64; 1024 px -> 128² latent; a 192² position table
    assert 2.02e9 < sum(p.numel() for p in transformer.parameters()) < 2.04e9
    assert len(transformer.transformer_blocks) == 24 and transformer.inner_dim == 24 * 64
    assert transformer.pos_embed.pos_embed.shape == (1, 192 * 192, 1536)
    assert (transformer.context_embedder.in_features, transformer.context_embedder.out_features) == (4096, 1536)
    assert pipe.text_encoder_3.config.d_model == 4096 and pipe.text_encoder_3.config.num_layers == 24
    assert (pipe.text_encoder.config.projection_dim, pipe.text_encoder_2.config.projection_dim) == (768, 1280)
    assert transformer.time_text_embed.text_embedder.linear_1.in_features == 768 + 1280
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    # shape-only tools build the transformer from the built-in config alone
    config = BUILTIN_DENOISER_CONFIGS["builtin:sd3-medium-shape"]
    assert denoiser_class(config) is type(transformer)
    assert sum(p.numel() for p in meta_unet(config).parameters()) == sum(p.numel() for p in transformer.parameters())


def test_sd3_medium_shape_macs_are_the_mmdit_arithmetic():
    # What `slimdiff bench --macs-only builtin:sd3-medium-shape` counts, against the MMDiT's arithmetic at 1024²:
    # 64² image tokens and 333 text tokens per call; every block's image stream, all but the last block's text
    # stream (context_pre_only: its text tokens get keys and values, no queries' outputs, no feed-forward)
    from slimdiff.bench.macs import count_macs, meta_unet
    from slimdiff.models import BUILTIN_DENOISER_CONFIGS

    macs = count_macs(meta_unet(BUILTIN_DENOISER_CONFIGS["builtin:sd3-medium-shape"]), 1, (128, 128))
    d, image, text, layers = 1536, 64 * 64, 333, 24
    assert macs.ffn == 8 * d * d * (layers * image + (layers - 1) * text)
    # q, k, v and the output projection per stream (the last block's text stream: q, k, v only)
    assert macs.attn1_proj == 4 * d * d * (layers * image + (layers - 1) * text) + 3 * d * d * text
    assert macs.attn1_products == 2 * (image + text) ** 2 * d * layers  # QKᵀ and AV over the joint tokens
    assert macs.attn2_proj == macs.attn2_products == 0  # no cross-attention: the text is in the joint attention
    assert macs.transformer / macs.total > 0.998


# --- the family ----------------------------------------------------------------------------------------------------


def test_the_family_knows_the_pipelines_transformer_call(sd3):
    family = family_for(sd3)
    assert family.name == "sd3" and family_for(sd3.transformer) is family
    assert family.denoiser(sd3) is sd3.transformer and family.text_context((), {}) is None
    calls = keyword_calls(sd3.transformer, lambda: _image(sd3))
    assert len(calls) == 2
    call = calls[0]
    # the text tokens: 77 CLIP + 256 T5 (the pipeline's max_sequence_length), side by side in one tensor
    assert call["encoder_hidden_states"].shape == (2, family.text_tokens, 96) and family.text_tokens == 333
    # the timestep is the float the flow-matching scheduler hands out (sigma · 1000), the same for the whole batch
    t = family.timestep((), call)
    assert t.dtype == torch.float32 and t.shape == (2,) and float(t[0]) == float(sd3.scheduler.timesteps[0])
    assert int(family.timestep((), calls[1])[0]) == int(sd3.scheduler.timesteps[1])
    # the dummy call has the pipeline's keys and shapes, and runs the transformer
    dummy = family.dummy_call(sd3.transformer.config, 2, (16, 16))
    tensors = {k: v for k, v in call.items() if torch.is_tensor(v)}
    assert {k: (v.shape, v.dtype) for k, v in dummy.items()} == {k: (v.shape, v.dtype) for k, v in tensors.items()}
    assert sd3.transformer(**dummy).sample.shape == (2, 16, 16, 16)
    with torch.device("meta"):
        meta = family.build(sd3.transformer.config)
    assert meta(**family.dummy_call(meta.config, 1, (8, 24), 20, device="meta")).sample.shape == (1, 16, 8, 24)


def test_without_t5_the_pipeline_pads_zeros_of_the_same_length(sd3):
    from diffusers import StableDiffusion3Pipeline

    no_t5 = StableDiffusion3Pipeline(**{**sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    no_t5.set_progress_bar_config(disable=True)
    family = family_for(no_t5)
    assert [t.encoder for t in family.text_towers(no_t5)] == [sd3.text_encoder, sd3.text_encoder_2]
    assert len(family.text_towers(sd3)) == 3 and family.text_towers(sd3)[2].encoder is sd3.text_encoder_3
    text = keyword_calls(no_t5.transformer, lambda: _image(no_t5))[0]["encoder_hidden_states"]
    assert text.shape[1] == family.text_tokens and (text[:, 77:] == 0).all() and text[:, :77].abs().sum() > 0


@pytest.mark.parametrize("guidance_scale", [None, 1.0])
def test_the_calibration_loop_runs_the_pipeline_on_seeded_latents(sd3, guidance_scale):
    from slimdiff.calibrate import CalibrationConfig
    from slimdiff.families import image_generators
    from slimdiff.families.sd import seeded_latents

    config = CalibrationConfig(steps=3, guidance_scale=guidance_scale)
    loop = family_for(sd3).calibration_loop(sd3, config)
    calls = keyword_calls(sd3.transformer, lambda: loop(PROMPTS[:2], [5, 9]))
    assert len(calls) == 3
    latents = seeded_latents(sd3.transformer, sd3.vae_scale_factor, config, image_generators([5, 9]))
    first = calls[0]["hidden_states"]
    if guidance_scale is None:  # the pipeline's own guidance (SD3: 7.0): unconditional and conditional halves
        assert sd3.guidance_scale == 7.0 and first.shape[0] == 4
        assert torch.equal(first[:2], latents) and torch.equal(first[2:], latents)
    else:  # guidance 1: no unconditional half
        assert first.shape[0] == 2 and torch.equal(first, latents)
    # seeded per prompt: a prompt's trajectory does not depend on its batch (its latent at the last step)
    alone = keyword_calls(sd3.transformer, lambda: loop(PROMPTS[1:2], [9]))
    assert torch.allclose(alone[-1]["hidden_states"][0], calls[-1]["hidden_states"][1], atol=1e-5)


def test_an_image_size_the_pipeline_cannot_sample_is_refused_before_calibration(sd3, tmp_path, capsys):
    from slimdiff.calibrate import CalibrationConfig, pipeline_loop
    from slimdiff.cli import main

    with pytest.raises(SlimDiffError,
                       match=r"image width 34 px: StableDiffusion3Pipeline takes positive multiples of 4 px"):
        pipeline_loop(sd3, CalibrationConfig(height=32, width=34))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:3]))
    assert main(["calibrate", "--model", "builtin:tiny-sd3", "--prompts", str(tmp_path / "prompts.txt"),
                 "--num-prompts", "2", "--pass1-prompts", "1", "--steps", "2", "--resolution", "30",
                 "--out", str(tmp_path / "stats")]) == 2
    assert "image height 30 px" in capsys.readouterr().err and not (tmp_path / "stats").exists()


# --- SlimSet and local folders -------------------------------------------------------------------------------------


def test_slimset_embeds_prompts_with_all_three_towers(sd3):
    from slimdiff.prompts import read_prompts
    from slimdiff.slimset import _prompt_embedding, select_slimset, text_embedder

    normalize = torch.nn.functional.normalize
    vectors = text_embedder(sd3, batch_size=4)(PROMPTS)
    parts = [normalize(_prompt_embedding(t.tokenizer, t.encoder, PROMPTS), dim=-1)
             for t in family_for(sd3).text_towers(sd3)]
    # CLIP-L's and CLIP-G's pooled projections (32 + 32) and the T5's masked token mean (96), each normalised
    assert [p.shape[1] for p in parts] == [32, 32, 96]
    assert torch.allclose(vectors, normalize(torch.cat(parts, -1), dim=-1), atol=1e-6)
    with torch.no_grad():
        ids = sd3.tokenizer(PROMPTS[:1], padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.allclose(parts[0][0], normalize(sd3.text_encoder(ids).text_embeds[0], dim=-1), atol=1e-6)
    pool = read_prompts(limit=40)
    picked = select_slimset(pool, text_embedder(sd3, batch_size=16)(pool), 6)
    again = select_slimset(pool, text_embedder(build_builtin("builtin:tiny-sd3"))(pool), 6)
    assert picked == again and len(set(picked.prompts)) == 6


def test_an_sd3_pipeline_folder_loads_with_or_without_t5(sd3, tmp_path):
    sd3.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / "pipe"))
    assert type(loaded) is type(sd3) and not loaded.transformer.training
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        saved, back = getattr(sd3, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved), name
    assert (_image(loaded) == _image(sd3)).all()
    # SD3 without its T5 tower (folders saved without it, or whose index lists none): zeros in its place
    for name in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(tmp_path / "pipe" / name)
    no_t5 = load_pipeline(str(tmp_path / "pipe"))
    assert no_t5.text_encoder_3 is None and no_t5.tokenizer_3 is None
    assert not (_image(no_t5) == _image(sd3)).all()


@pytest.mark.parametrize("cls_name", ["StableDiffusion3Img2ImgPipeline", "StableDiffusion3ControlNetPipeline"])
def test_other_sd3_pipeline_folders(sd3, cls_name, tmp_path):
    folder = tmp_path / "pipe"
    sd3.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": cls_name}))
    if cls_name == "StableDiffusion3Img2ImgPipeline":  # the same components: loads as the text-to-image pipeline
        assert type(load_pipeline(str(folder))) is type(sd3)
        return
    with pytest.raises(SlimDiffError, match=f"is a {cls_name} folder; slimdiff calibrates SD3 through its "
                                            "text-to-image pipeline"):
        load_pipeline(str(folder))


@pytest.mark.parametrize("component", ["transformer", "text_encoder_2", "tokenizer_3"])
def test_an_incomplete_sd3_folder_is_one_line(sd3, component, tmp_path):
    folder = tmp_path / "pipe"
    sd3.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / component)
    with pytest.raises(SlimDiffError, match=rf"StableDiffusion3Pipeline folder without {component} ") as err:
        load_pipeline(str(folder))
    assert "\n" not in str(err.value)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, component: [None, None]}))
    with pytest.raises(SlimDiffError, match=f"without {component} "):
        load_pipeline(str(folder))


# --- the slim class --------------------------------------------------------------------------------------------------


def test_the_slim_sd3_class_is_registered_and_needs_a_plan():
    import inspect

    from diffusers import SD3Transformer2DModel

    import slimdiff
    from slimdiff.configs import TINY_SD3_TRANSFORMER
    from slimdiff.slim_models import SLIM_CLASSES, SlimSD3Transformer2DModel, slim_class_for

    assert slimdiff.SlimSD3Transformer2DModel is SlimSD3Transformer2DModel
    assert SLIM_CLASSES["SlimSD3Transformer2DModel"] is SlimSD3Transformer2DModel
    assert SlimSD3Transformer2DModel.dense_class is SD3Transformer2DModel
    assert "slimdiff.SlimSD3Transformer2DModel.from_pretrained" in SlimSD3Transformer2DModel.dense_loader_stop[
        "quant_method"]
    assert {"joint_attention_dim", "pos_embed_max_size", "rank_plan"} <= set(
        inspect.signature(SlimSD3Transformer2DModel.__init__).parameters)
    assert slim_class_for(SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)) is SlimSD3Transformer2DModel
    with pytest.raises(SlimDiffError, match="SlimSD3Transformer2DModel needs a rank_plan"):
        SlimSD3Transformer2DModel.from_config(dict(TINY_SD3_TRANSFORMER))


# --- slimming ------------------------------------------------------------------------------------------------------


def test_calibrate_and_slim_commands_make_a_slim_sd3_pipeline(sd3, tmp_path, capsys):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    from slimdiff.cli import main
    from slimdiff.families.mmdit import SlimJointAttnProcessor
    from slimdiff.slim_models import SlimSD3Transformer2DModel

    stats, out, saved = tmp_path / "stats", tmp_path / "slim", tmp_path / "pipe"
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))  # a small pool: SlimSet picks 3 of its 6
    assert main(["calibrate", "--model", "builtin:tiny-sd3", "--prompts", str(tmp_path / "prompts.txt"),
                 "--num-prompts", "3", "--pass1-prompts", "1", "--steps", "2", "--out", str(stats)]) == 0
    assert main(["slim", "--model", "builtin:tiny-sd3", "--stats", str(stats), "--budget", "0.3", "--out", str(out),
                 "--save-pipeline", str(saved)]) == 0
    assert "SlimSD3Transformer2DModel" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert all(f"transformer_blocks.{name}" in table for name in ("0.attn.vo", "0.ff_context", "1.attn.qk", "1.ff"))
    pipe = load_pipeline(str(out))  # the pipeline it was slimmed from, with the slim transformer in it
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.transformer, SlimSD3Transformer2DModel)
    plan = pipe.transformer.slim_plan
    assert plan.params_removed == (sum(p.numel() for p in sd3.transformer.parameters())
                                   - sum(p.numel() for p in pipe.transformer.parameters())) > 0
    narrowed = [name for name, e in plan.modules.items() if e.kind != "ffn" and e.rank < e.width]
    assert narrowed and all(isinstance(pipe.transformer.get_submodule(n.rsplit(".", 1)[0]).processor,
                                       SlimJointAttnProcessor) for n in narrowed)
    image = _image(pipe)
    assert image.shape == (1, 32, 32, 3) and not (image == _image(sd3)).all()
    loaded = DiffusionPipeline.from_pretrained(saved)  # plain diffusers, the slim class imported
    assert isinstance(loaded.transformer, SlimSD3Transformer2DModel)
    loaded.set_progress_bar_config(disable=True)
    assert (_image(loaded) == image).all()


def test_slim_pipeline_slims_the_transformer_in_place():
    import slimdiff
    from slimdiff.calibrate import CalibrationConfig

    pipe = build_builtin("builtin:tiny-sd3")
    before = sum(p.numel() for p in pipe.transformer.parameters())
    report = slimdiff.slim_pipeline(pipe, slimdiff.SlimConfig(budget=0.3), prompts=PROMPTS[:3], num_prompts=3,
                                    calibration=CalibrationConfig(steps=2, pass1_prompts=1), progress=False)
    after = sum(p.numel() for p in pipe.transformer.parameters())
    assert before - after == report.plan.params_removed > 0
    assert set(report.plan.modules) == {s.name for s in slimdiff.models.module_sites(build_builtin(
        "builtin:tiny-sd3").transformer)}
    assert _image(pipe).std() > 0


def test_an_sd35_medium_style_transformer_slims_through_the_same_family(sd3):
    # SD3.5 Medium: RMS q/k norms in every attention, a second image-only attention in the first blocks
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    import slimdiff
    from slimdiff.calibrate import CalibrationConfig
    from slimdiff.configs import TINY_SD3_TRANSFORMER
    from slimdiff.models import _seeded

    config = dict(TINY_SD3_TRANSFORMER, dual_attention_layers=(0,), qk_norm="rms_norm")
    transformer = _seeded(0, lambda: SD3Transformer2DModel(**config)).eval().requires_grad_(False)
    pipe = StableDiffusion3Pipeline(**{**sd3.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    assert family_for(pipe).name == "sd3"
    dense = _image(pipe)
    report = slimdiff.slim_pipeline(pipe, slimdiff.SlimConfig(budget=0.3), prompts=PROMPTS[:3], num_prompts=3,
                                    calibration=CalibrationConfig(steps=2, pass1_prompts=1), progress=False)
    plan = report.plan.modules
    assert "transformer_blocks.0.attn2.vo" in plan and not [name for name in plan if name.endswith(".qk")]
    assert report.plan.params_removed > 0
    image = _image(pipe)
    assert image.shape == dense.shape and not (image == dense).all()


# --- export and engines ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(folder, stdout)`` of one ``slimdiff-export --model builtin:tiny-sd3 --engine ort`` run (dense and slim
    engines over the default range of image sizes, 16-48 px)."""
    import contextlib
    import io

    from export_support import FAST_CALIBRATION

    from slimdiff.cli import export as cli

    out = tmp_path_factory.mktemp("sd3") / "engines"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))  # a small pool: SlimSet's choice is tested on its own
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["--model", "builtin:tiny-sd3", "--engine", "ort", "--out", str(out), "--budget", "0.3",
                       *FAST_CALIBRATION, "--prompts", str(prompts)])
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue()


def test_the_family_declares_the_transformer_export(sd3):
    from slimdiff.export.modules import denoiser_component

    component = denoiser_component(sd3.transformer)
    assert component.name == "transformer" and component.attention_modules == 2
    assert [(s.name, s.dims, s.dtype) for s in component.inputs] == [
        ("hidden_states", ("batch", 16, "height", "width"), "model"), ("timestep", ("batch",), "float32"),
        ("encoder_hidden_states", ("batch", "text_len", 96), "model"), ("pooled_projections", ("batch", 64), "model")]
    assert family_for(sd3).static_axes == () and family_for(sd3).default_text_len(sd3) == "333"
    x, t, text, pooled = component.random_inputs({"batch": 2, "height": 8, "width": 16, "text_len": 20},
                                                  torch.float32, seed=1)
    with torch.no_grad():
        ref = sd3.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                              return_dict=False)[0]
        assert torch.equal(component.module(x, t, text, pooled), ref)
        assert not torch.allclose(component.module(x, t, text, pooled.flip(0)), ref, atol=1e-3)


def test_sizes_beyond_the_position_table_are_refused_before_any_work(tmp_path, capsys):
    from slimdiff.cli import export as cli

    # tiny-sd3: a 24² position table of 2-pixel patches serves latents up to 48 (96 px with the tiny VAE)
    assert cli.main(["--model", "builtin:tiny-sd3", "--engine", "ort", "--out", str(tmp_path / "o"),
                     "--height", "32:64:112", "--width", "32"]) == 2
    # (transformers may warn on first import that torchvision is absent: not slimdiff's output)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[transformers]")]
    assert len(err) == 1 and "latent height of up to 56" in err[0] and "at most 48" in err[0]
    assert "--height" in err[0] and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_export_builds_verified_dense_and_slim_transformer_engines(exported):
    from slimdiff.engines.trt import optimization_profiles

    out, stdout = exported
    report = json.loads((out / "export.json").read_text())
    assert report["denoiser"] == "transformer"
    assert report["pytorch_components"] == ["text_encoder", "text_encoder_2", "text_encoder_3", "vae"]
    # a range of image sizes (16-48 px: latent 8-24) and the pipeline's 333 text tokens
    assert report["profiles"] == [{"batch": [1, 2, 4], "height": [8, 16, 24], "width": [8, 16, 24],
                                   "text_len": [333, 333, 333]}]
    assert [(r["variant"], r["file"]) for r in report["rows"]] == [("dense", "dense/transformer.ort.onnx"),
                                                                   ("slim", "slim/transformer.ort.onnx")]
    assert all(r["max_rel_error"] <= 1e-4 for r in report["rows"])
    assert report["rows"][1]["parameters"] < report["rows"][0]["parameters"]
    assert "slim transformer:" in stdout
    for variant in ("dense", "slim"):
        sidecar = json.loads((out / variant / "transformer.onnx.json").read_text())
        # every joint attention is one fused Attention op; parity checked at two latent sizes through one graph
        assert sidecar["fused"]["Attention"] == sidecar["attention_modules"] == 2
        assert sidecar["parity"]["max_rel_error"] <= 1e-4 and len(sidecar["parity"]["shapes"]) == 2
        meta = json.loads((out / variant / "transformer.engine.json").read_text())
        assert meta["family"] == "sd3" and meta["output_dims"][:2] == ["batch", 16]
        # what a TensorRT build would take: one optimization profile over batch and image size
        trt = optimization_profiles(sidecar)[0]
        assert trt["hidden_states"] == ((1, 16, 8, 8), (2, 16, 16, 16), (4, 16, 24, 24))
        assert trt["encoder_hidden_states"] == ((1, 333, 96), (2, 333, 96), (4, 333, 96))
        assert trt["pooled_projections"] == ((1, 64), (2, 64), (4, 64))


def test_the_onnx_engine_answers_as_the_transformer_at_several_sizes(exported, sd3):
    from slimdiff.runtime import EnginePixArtTransformer, EngineSD3Transformer

    out, _ = exported
    engine = EngineSD3Transformer.from_folder(out / "dense")
    assert engine.config.joint_attention_dim == 96 and engine.in_channels == engine.out_channels == 16
    gen = torch.Generator().manual_seed(5)
    # the position table is cropped around its centre for each latent size: one graph serves them all
    for batch, h, w in ((2, 16, 16), (1, 24, 8), (4, 8, 24)):
        call = dict(hidden_states=torch.randn(batch, 16, h, w, generator=gen),
                    timestep=torch.rand(batch, generator=gen) * 1000,
                    encoder_hidden_states=torch.randn(batch, 333, 96, generator=gen),
                    pooled_projections=torch.randn(batch, 64, generator=gen), return_dict=False)
        with torch.no_grad():
            ref = sd3.transformer(**call)[0]
        got = engine(**call)[0]
        assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    with pytest.raises(SlimDiffError, match="do not support joint_attention_kwargs, skip_layers"):
        engine(**call, joint_attention_kwargs={"scale": 0.5}, skip_layers=[0])
    with pytest.raises(SlimDiffError, match=r"outside this engine's shapes"):
        engine(**{**call, "hidden_states": torch.randn(batch, 16, 32, 32)})
    with pytest.raises(SlimDiffError, match="is a sd3 'transformer' engine, not one EnginePixArtTransformer drives"):
        EnginePixArtTransformer.from_folder(out / "dense")


@pytest.mark.parametrize("variant", ["dense", "slim"])
def test_the_engine_in_the_pipeline_makes_the_pytorch_image(exported, variant):
    from slimdiff.runtime import EngineSD3Transformer, use_engine

    out, _ = exported
    pipe = load_pipeline("builtin:tiny-sd3" if variant == "dense" else str(out / "slim-unet"))
    reference = _image(pipe)[0]
    engine = use_engine(pipe, out / variant)
    assert pipe.transformer is engine and isinstance(engine, EngineSD3Transformer)
    image = _image(pipe)[0]
    assert image.shape == reference.shape == (32, 32, 3)
    assert np.abs(image - reference).max() < 1e-3
    assert np.abs(reference - reference.mean()).max() > 1e-3  # not a flat image: the comparison has content
    with pytest.raises(SlimDiffError, match="not built for this pipeline's transformer"):
        use_engine(build_builtin("builtin:tiny-pixart"), out / variant)


def test_bench_times_the_exported_engines_dense_vs_slim(exported):
    # `slimdiff bench <export folder>`: the SD3 transformer's dense and slim ONNX Runtime engines timed interleaved,
    # each checked against the eager transformer, on the inputs the family makes for a prompt (pooled projections,
    # float timestep), and end to end in the pipeline with the transformer calls routed to each engine.
    from slimdiff.bench.harness import BenchConfig, run_bench
    from slimdiff.bench.report import validate_report

    out, _ = exported
    report = run_bench(BenchConfig(model=str(out), engines=["ort"], budgets=[0.0], batches=[2], device="cpu",
                                   warmup=1, iters=2, e2e_steps=2, e2e_runs=1), log=lambda msg: None)
    validate_report(report)
    assert report["model"]["denoiser"] == "transformer" and report["model"]["plan_source"] == "calibrated"
    dense, slim = report["results"]
    assert dense["status"] == slim["status"] == "ok" and slim["budget"] > 0, report["results"]
    assert slim["interleaved"]["interval"]["pairs"] == 2 and slim["speedup_status"] in ("measured", "noisy")
    assert slim["ideal_speedup"] > 1.0 and 0 < slim["error_vs_dense"] < 1.0  # a calibrated slim transformer
    assert dense["error_vs_eager"] < 1e-4 and slim["error_vs_eager"] < 1e-4
    # two sampling steps, one transformer call each on the guided batch of 2
    assert dense["e2e"]["unet_calls"] == slim["e2e"]["unet_calls"] == 2
    assert dense["e2e"]["image_error_vs_dense"] < 1e-3 < slim["e2e"]["image_error_vs_dense"]


def test_eval_compares_the_exported_slim_transformer_with_the_dense_one(exported, tmp_path):
    # `slimdiff eval` on SD3: the slim transformer probed along the dense trajectory (flow-matching float timesteps
    # read by the family), then sampled from the same seeds
    from slimdiff.cli.commands import main

    out, _ = exported
    slim = out / json.loads((out / "export.json").read_text())["slim_model"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]))
    assert main(["eval", "--model", "builtin:tiny-sd3", "--slim", str(slim), "--prompts", str(prompts), "--num", "2",
                 "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["unet_calls_per_image"] == 2 and report["label"].startswith("seeded random")
    assert 0 < report["metrics"]["noise_prediction_error"]["mean"] < 1  # a calibrated slim transformer, not a copy
    assert report["metrics"]["fidelity"]["psnr_db"]["mean"] < 100  # its images differ from the dense ones
    assert report["slim"]["macs"] < report["dense"]["macs"] and report["slim"]["params"] < report["dense"]["params"]
