"""PixArt models: the tiny built-in, local PixArt pipeline folders, T5 prompt embeddings for SlimSet, and the slim
PixArt transformer class (save / load / diffusers loaders)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from slimdiff.errors import SlimDiffError
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.slimset import _prompt_embedding, select_slimset

PROMPTS = ["a red cube on a table", "two blue spheres", "a green pyramid at night", "a cat", "a yellow star",
           "three small purple cones under a lamp"]


def _image(pipe, prompt: str = PROMPTS[0]):
    # The tiny latent (16x16) is outside PixArt's aspect-ratio bins, which assume an 8x VAE.
    return pipe(prompt, num_inference_steps=2, use_resolution_binning=False, clean_caption=False,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def pixart():
    return build_builtin("builtin:tiny-pixart")


def test_tiny_pixart_is_a_pixart_sigma_pipeline_and_draws_an_image(pixart):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from diffusers.models.attention import BasicTransformerBlock
    from transformers import T5EncoderModel

    assert isinstance(pixart, PixArtSigmaPipeline)
    transformer, t5 = pixart.transformer, pixart.text_encoder
    assert isinstance(transformer, PixArtTransformer2DModel) and isinstance(t5, T5EncoderModel)
    assert isinstance(pixart.scheduler, DPMSolverMultistepScheduler)
    cfg = transformer.config
    assert cfg.caption_channels == t5.config.d_model != cfg.cross_attention_dim
    assert cfg.cross_attention_dim == cfg.num_attention_heads * cfg.attention_head_dim
    assert cfg.out_channels == 2 * cfg.in_channels  # learned sigma, as PixArt-Σ
    blocks = [m for m in transformer.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == cfg.num_layers and all(b.norm_type == "ada_norm_single" for b in blocks)
    assert t5.config.vocab_size >= len(pixart.tokenizer)
    assert not any(p.requires_grad for p in pixart.transformer.parameters())

    image = _image(pixart)
    assert image.shape == (1, 32, 32, 3) and image.std() > 0
    assert (image == _image(build_builtin("builtin:tiny-pixart"))).all()  # seeded: the same weights every time
    assert not (image == _image(pixart, PROMPTS[1])).all()  # the prompt reaches the image


def test_tiny_pixart_builds_on_the_meta_device():
    pipe = build_builtin("builtin:tiny-pixart", device="meta")
    assert pipe.transformer.device.type == "meta" and pipe.text_encoder.device.type == "meta"


@pytest.mark.parametrize("pipeline_class", ["PixArtSigmaPipeline", "PixArtAlphaPipeline"])
def test_a_pixart_pipeline_folder_loads(pixart, pipeline_class, tmp_path):
    import diffusers

    source = getattr(diffusers, pipeline_class)(**pixart.components)
    source.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / "pipe"))
    assert type(loaded).__name__ == pipeline_class
    assert not loaded.transformer.training and not any(p.requires_grad for p in loaded.text_encoder.parameters())
    for name in ("transformer", "text_encoder", "vae"):
        saved, back = getattr(pixart, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved), name
    if pipeline_class == "PixArtSigmaPipeline":
        assert (_image(loaded) == _image(pixart)).all()


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_a_pixart_folder_without_its_transformer_or_text_encoder_is_one_line(pixart, component, tmp_path):
    folder = tmp_path / "pipe"
    pixart.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / component)
    with pytest.raises(SlimDiffError, match=rf"PixArtSigmaPipeline folder without {component} ") as err:
        load_pipeline(str(folder))
    assert "\n" not in str(err.value)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, component: [None, None]}))
    with pytest.raises(SlimDiffError, match=f"without {component} "):
        load_pipeline(str(folder))


def test_t5_prompt_embedding_is_the_masked_token_mean(pixart):
    tokenizer, t5 = pixart.tokenizer, pixart.text_encoder
    embed = lambda prompts: _prompt_embedding(tokenizer, t5, prompts)  # noqa: E731
    batch = embed(PROMPTS)
    assert batch.shape == (len(PROMPTS), t5.config.d_model) and batch.dtype == torch.float32
    # padding is left out: a prompt alone gets the vector it gets next to a longer one
    alone = embed([PROMPTS[3]])
    assert torch.allclose(alone[0], batch[3], atol=1e-5, rtol=1e-5)
    # ... and it is the mean of the prompt's own token states
    ids = tokenizer([PROMPTS[3]], return_tensors="pt").input_ids
    assert torch.allclose(alone, t5(ids).last_hidden_state.mean(1), atol=1e-6)
    unit = torch.nn.functional.normalize(batch, dim=-1)
    picked = select_slimset(PROMPTS, unit, 3)
    assert picked == select_slimset(PROMPTS, torch.nn.functional.normalize(embed(PROMPTS), dim=-1), 3)
    assert len(set(picked.indices)) == 3


# --- slim model classes: one mechanism for every dense class ------------------------------------------------


def test_each_slim_class_is_registered_and_names_itself():
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    from slimdiff.configs import TINY_PIXART_TRANSFORMER
    from slimdiff.slim_models import (
        SLIM_CLASSES,
        SlimFluxTransformer2DModel,
        SlimPixArtTransformer2DModel,
        SlimSD3Transformer2DModel,
        SlimUNet2DConditionModel,
    )

    assert SLIM_CLASSES == {"SlimUNet2DConditionModel": SlimUNet2DConditionModel,
                            "SlimPixArtTransformer2DModel": SlimPixArtTransformer2DModel,
                            "SlimSD3Transformer2DModel": SlimSD3Transformer2DModel,
                            "SlimFluxTransformer2DModel": SlimFluxTransformer2DModel}
    assert SlimUNet2DConditionModel.dense_class is UNet2DConditionModel
    assert SlimPixArtTransformer2DModel.dense_class is PixArtTransformer2DModel
    for cls in SLIM_CLASSES.values():
        assert f"slimdiff.{cls.__name__}.from_pretrained" in cls.dense_loader_stop["quant_method"]
    # diffusers reads config keys off __init__: the dense class's, plus rank_plan
    import inspect

    params = inspect.signature(SlimPixArtTransformer2DModel.__init__).parameters
    assert {"caption_channels", "norm_type", "rank_plan"} <= set(params)
    with pytest.raises(SlimDiffError, match="SlimPixArtTransformer2DModel needs a rank_plan"):
        SlimPixArtTransformer2DModel.from_config(dict(TINY_PIXART_TRANSFORMER))


def _halved_unet_plan(unet):
    from slimdiff.families import module_sites
    from slimdiff.plan import RankPlan

    sites = module_sites(unet)
    return RankPlan.from_ranks(sites, {s.name: max(8, s.width // 2) for s in sites})


def test_a_slim_folder_of_an_earlier_slimdiff_still_loads(tiny_pipe, tmp_path):
    # Earlier folders hold the dense UNet2DConditionModel config; the plan is only in slimdiff_plan.json.
    from slimdiff.rebuild import apply_plan_shapes
    from slimdiff.serialization import load_slim, save_slim, verify_slim_folder
    from slimdiff.slim_models import SlimUNet2DConditionModel

    unet = tiny_pipe.unet
    plan = _halved_unet_plan(unet)
    apply_plan_shapes(unet, plan)  # the resized Linears are left uninitialised
    gen = torch.Generator().manual_seed(0)
    for p in unet.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.05
    save_slim(unet, plan, tmp_path / "slim")
    config = json.loads((tmp_path / "slim" / "config.json").read_text())
    dense = {k: v for k, v in config.items() if k not in ("rank_plan", "quantization_config")}
    (tmp_path / "slim" / "config.json").write_text(json.dumps({**dense, "_class_name": "UNet2DConditionModel"}))
    verify_slim_folder(tmp_path / "slim")
    loaded = load_slim(tmp_path / "slim")
    assert type(loaded) is SlimUNet2DConditionModel and loaded.slim_plan.modules == plan.modules
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    e = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(1))
    ref = unet(x, 321, e).sample
    assert ref.isfinite().all() and torch.equal(loaded(x, 321, e).sample, ref)

    (tmp_path / "slim" / "config.json").write_text(json.dumps({**dense, "_class_name": "HunyuanDiT2DModel"}))
    with pytest.raises(SlimDiffError, match="names 'HunyuanDiT2DModel', which is no model class slimdiff slims"):
        load_slim(tmp_path / "slim")


# --- a slim PixArt transformer: made by slimdiff, saved, loaded by slimdiff and by diffusers ------------------


@pytest.fixture(scope="module")
def slim_pixart():
    """(dense tiny-pixart, the same pipeline with its transformer slimmed, the slimming report)."""
    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.slim import SlimConfig, slim_unet

    dense = build_builtin("builtin:tiny-pixart")
    pipe = build_builtin("builtin:tiny-pixart")
    stats = calibrate(pipe, PROMPTS[:3], None, CalibrationConfig(steps=2, pass1_prompts=1, batch_size=1),
                      progress=False)
    report = slim_unet(pipe.transformer, stats, SlimConfig(budget=0.3), progress=False)
    report.plan.info["source_model"] = "builtin:tiny-pixart"
    return dense, pipe, report


def _transformer_call(transformer):
    gen = torch.Generator().manual_seed(7)
    mask = torch.ones(2, 12)
    mask[1, 5:] = 0  # the second prompt is shorter: padding masked, as the pipeline passes it
    return dict(hidden_states=torch.randn(2, 4, 16, 16, generator=gen), timestep=torch.tensor([421, 421]),
                encoder_hidden_states=torch.randn(2, 12, transformer.config.caption_channels, generator=gen),
                encoder_attention_mask=mask, added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def test_a_slim_pixart_transformer_round_trips_bit_identically(slim_pixart, tmp_path):
    from diffusers import PixArtTransformer2DModel

    from slimdiff.serialization import is_slim_folder, load_plan, load_slim, save_slim, verify_slim_folder
    from slimdiff.slim_models import SlimPixArtTransformer2DModel

    dense, pipe, report = slim_pixart
    transformer = pipe.transformer
    assert report.plan.params_removed > 0
    assert (sum(p.numel() for p in dense.transformer.parameters()) - sum(p.numel() for p in transformer.parameters())
            == report.plan.params_removed)
    call = _transformer_call(transformer)
    ref = transformer(**call).sample
    wrapped = SlimPixArtTransformer2DModel.from_slim(transformer, report.plan)  # parameters and buffers shared
    assert torch.equal(wrapped(**call).sample, ref)
    save_slim(transformer, report.plan, tmp_path / "slim")
    assert json.loads((tmp_path / "slim" / "config.json").read_text())["_class_name"] == "SlimPixArtTransformer2DModel"
    assert is_slim_folder(tmp_path / "slim") and load_plan(tmp_path / "slim").modules == report.plan.modules
    verify_slim_folder(tmp_path / "slim")
    loaded = load_slim(tmp_path / "slim")
    assert type(loaded) is SlimPixArtTransformer2DModel and loaded.slim_plan.modules == report.plan.modules
    assert torch.equal(loaded(**call).sample, ref)
    native = SlimPixArtTransformer2DModel.from_pretrained(tmp_path / "slim")
    assert torch.equal(native(**call).sample, ref)
    native.save_pretrained(tmp_path / "again")
    assert torch.equal(SlimPixArtTransformer2DModel.from_pretrained(tmp_path / "again")(**call).sample, ref)
    # The dense class refuses a slim folder by naming slimdiff and the slim class, before it reads any weight.
    with pytest.raises(ValueError, match=r"PixArtTransformer2DModel slimmed by slimdiff; load it with "
                                         r"slimdiff\.SlimPixArtTransformer2DModel\.from_pretrained"):
        PixArtTransformer2DModel.from_pretrained(tmp_path / "slim")


def test_a_slim_pixart_pipeline_folder_loads_with_diffusers_and_slimdiff(slim_pixart, tmp_path):
    from diffusers import DiffusionPipeline

    from slimdiff.serialization import save_slim, save_slim_pipeline
    from slimdiff.slim_models import SlimPixArtTransformer2DModel

    dense, pipe, report = slim_pixart
    before = pipe.transformer
    save_slim_pipeline(pipe, report.plan, tmp_path / "pipe")
    assert pipe.transformer is before  # the pipeline keeps its own transformer
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["slimdiff.slim_models", "SlimPixArtTransformer2DModel"]
    assert (tmp_path / "pipe" / "transformer" / "slimdiff_plan.json").is_file()
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded) is type(pipe) and isinstance(loaded.transformer, SlimPixArtTransformer2DModel)
    loaded.set_progress_bar_config(disable=True)
    image = _image(loaded)
    assert image.shape == (1, 32, 32, 3) and image.std() > 0
    assert (image == _image(pipe)).all()
    assert not (image == _image(dense)).all()  # the dense transformer draws another image
    # A slim transformer folder loads as the pipeline it was slimmed from, its transformer the slim one.
    save_slim(pipe.transformer, report.plan, tmp_path / "slim")
    again = load_pipeline(str(tmp_path / "slim"))
    assert isinstance(again.transformer, SlimPixArtTransformer2DModel)
    assert (_image(again) == image).all()


def test_slimset_picks_tiny_pixart_prompts_deterministically(pixart):
    from slimdiff.prompts import read_prompts
    from slimdiff.slimset import text_embedder

    pool = read_prompts(limit=60)
    embed = text_embedder(pixart, batch_size=16)
    vectors = embed(pool)
    assert vectors.shape == (60, pixart.text_encoder.config.d_model)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(60), atol=1e-6)
    first = select_slimset(pool, vectors, 8)
    assert first == select_slimset(pool, text_embedder(build_builtin("builtin:tiny-pixart"))(pool), 8)
    assert len(set(first.prompts)) == 8


def test_pixart_sigma_shape_has_the_published_geometry_on_the_meta_device():
    from slimdiff.families import FFN, QK, module_sites

    pipe = build_builtin("builtin:pixart-sigma-shape", device="meta")
    transformer = pipe.transformer
    assert transformer.device.type == "meta"
    # 0.6 B parameters (the PixArt-Σ paper's XL/2 size); 1024 px -> 128² latent -> 64² patches of 2
    assert 0.60e9 < sum(p.numel() for p in transformer.parameters()) < 0.62e9
    assert transformer.pos_embed.pos_embed.shape == (1, 64 * 64, 1152)
    assert transformer.caption_projection.linear_1.in_features == pipe.text_encoder.config.d_model == 4096
    sites = module_sites(transformer)
    assert len(sites) == 28 * 5  # per block: the FFN, Q·K and V·O of self- and cross-attention
    assert {s.width for s in sites if s.kind == FFN} == {4 * 1152}
    assert {(s.heads, s.width) for s in sites if s.kind == QK} == {(16, 72)}
