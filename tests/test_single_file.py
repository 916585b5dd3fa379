"""Original-layout single-file checkpoints load offline, with exactly the weights they were made from."""

import json

import pytest
import torch
from original_layout import to_original_layout, unet_key
from safetensors.torch import save_file

from slimdiff.cli import main
from slimdiff.errors import SlimDiffError
from slimdiff.models import TINY_TEXT, TINY_UNET, TINY_VAE, build_builtin, load_pipeline
from slimdiff.single_file import UNET_PREFIX, _clip_bpe_tokenizer, _shipped, choose_config, detect_family


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _assert_same_weights(loaded, source, names=("unet", "vae", "text_encoder")):
    for name in names:
        got, want = getattr(loaded, name).state_dict(), getattr(source, name).state_dict()
        assert got.keys() == want.keys(), name
        different = [k for k in want if not torch.equal(got[k].float(), want[k].float())]
        assert not different, f"{name}: {different[:5]}"


def _tiny_sd2():
    """builtin:tiny restyled as SD-2.x: linear projections in the transformers, GELU text encoder (OpenCLIP)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from slimdiff.models import builtin_tokenizer

    torch.manual_seed(5)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, "hidden_act": "gelu"})),
        tokenizer=builtin_tokenizer(), unet=UNet2DConditionModel(**TINY_UNET, use_linear_projection=True),
        scheduler=DDIMScheduler(prediction_type="v_prediction"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def test_sd1_checkpoint_loads_offline_with_the_shipped_configuration(tmp_path):
    source = build_builtin("builtin:tiny")
    ckpt = tmp_path / "tiny-v1.safetensors"
    save_file(to_original_layout(source), str(ckpt))
    loaded = load_pipeline(str(ckpt))
    _assert_same_weights(loaded, source)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert loaded.tokenizer("a cat").input_ids == source.tokenizer("a cat").input_ids


def test_sd2_v_prediction_checkpoint_loads_with_a_config_folder(tmp_path):
    source = _tiny_sd2()
    source.save_pretrained(tmp_path / "config")
    ckpt = tmp_path / "tiny-v2.safetensors"
    save_file(to_original_layout(source, "open_clip"), str(ckpt))
    assert detect_family({k: tuple(v.shape) for k, v in to_original_layout(source, "open_clip").items()},
                         "x") == "sd2"
    loaded = load_pipeline(str(ckpt), config=str(tmp_path / "config"))
    _assert_same_weights(loaded, source)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.unet.config.use_linear_projection


def _tiny_sdxl():
    """SDXL's structure at toy width (two text towers of different widths, as CLIP-L and OpenCLIP-bigG are)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from slimdiff.models import builtin_tokenizer

    torch.manual_seed(6)
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=80, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=48 + 6 * 8)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE), unet=unet, scheduler=EulerDiscreteScheduler(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, "hidden_size": 32, "intermediate_size": 64})),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**{
            **TINY_TEXT, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48, "hidden_act": "gelu"})),
        tokenizer=builtin_tokenizer(), tokenizer_2=builtin_tokenizer())


def test_sdxl_checkpoint_loads_with_a_config_folder(tmp_path):
    source = _tiny_sdxl()
    source.save_pretrained(tmp_path / "config")
    state = to_original_layout(source, "sdxl")
    assert detect_family({k: tuple(v.shape) for k, v in state.items()}, "x") == "sdxl"
    save_file(state, str(tmp_path / "tiny-xl.safetensors"))
    loaded = load_pipeline(str(tmp_path / "tiny-xl.safetensors"), config=str(tmp_path / "config"))
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    _assert_same_weights(loaded, source, ("unet", "vae", "text_encoder", "text_encoder_2"))


def _original_shapes(unet_config, text_config, text_key):
    """Header shapes of a full-size checkpoint, from models built on the meta device (no memory, no time)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        text = CLIPTextModel(CLIPTextConfig(**text_config))
    shapes = {UNET_PREFIX + unet_key(k, unet.config): tuple(v.shape) for k, v in unet.state_dict().items()}
    vocab, width = text.get_input_embeddings().weight.shape
    return shapes | {text_key: (vocab, width)}


@pytest.mark.parametrize("family, expected", [("sd1", "SD-1.5"), ("sd2", "SD-2.1 (768 px, v-prediction)")])
def test_full_size_checkpoints_find_their_shipped_configuration(family, expected):
    shipped = {c.name: c for configs in _shipped().values() for c in configs}[expected]
    key = {"sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
           "sd2": "cond_stage_model.model.token_embedding.weight"}[family]
    shapes = _original_shapes(shipped.unet, shipped.text, key)
    assert detect_family(shapes, "ckpt") == family
    assert choose_config(shapes, family, "ckpt").name == expected


def test_clip_tokenizer_is_clips():
    tokenizer = _clip_bpe_tokenizer("<|endoftext|>")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_cli_slims_a_single_file_checkpoint(tmp_path, capsys):
    source = build_builtin("builtin:tiny")
    ckpt = tmp_path / "tiny.safetensors"
    save_file(to_original_layout(source), str(ckpt))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "slim"
    assert main(["slim", "--model", str(ckpt), "--prompts", str(prompts), "--num-prompts", "2", "--steps", "2",
                 "--pass1-prompts", "1", "--budget", "0.3", "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "slimdiff_plan.json").read_text())["info"]["source_model"] == str(ckpt.resolve())


def _fails(argv, capsys, fragment):
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("slimdiff: error:")]
    assert len(err) == 1 and fragment in err[0], err


def test_checkpoints_that_cannot_be_loaded_say_why(tmp_path, capsys):
    out = ["--budget", "0.3", "--out", str(tmp_path / "never")]
    source = build_builtin("builtin:tiny")
    diffusers_file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.unet.state_dict().items()}, str(diffusers_file))
    _fails(["slim", "--model", str(diffusers_file), *out], capsys, "not an original-layout Stable Diffusion")
    state = to_original_layout(source)
    inpaint = dict(state)
    inpaint[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(inpaint, str(tmp_path / "inpaint.safetensors"))
    _fails(["slim", "--model", str(tmp_path / "inpaint.safetensors"), *out], capsys, "9 input channels")
    wider = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    wider["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(514, 48)
    save_file(wider, str(tmp_path / "other.safetensors"))
    _fails(["slim", "--model", str(tmp_path / "other.safetensors"), *out], capsys, "matches none of the configurations")
    _fails(["slim", "--model", str(tmp_path / "other.safetensors"), "--config", str(tmp_path), *out], capsys,
           "no model_index.json")
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    _fails(["slim", "--model", str(tmp_path / "truncated.safetensors"), *out], capsys, "not a readable safetensors")
    assert not (tmp_path / "never").exists()


def test_sdxl_checkpoint_needs_a_config_folder_until_one_is_shipped():
    with pytest.raises(SlimDiffError, match="matches none"):
        choose_config({UNET_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3),
                       "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (1, 1)},
                      "sdxl", "x")
