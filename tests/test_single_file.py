"""Original-layout single-file checkpoints load offline, with exactly the weights they were made from."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from loaded_images import assert_draws_alike
from original_layout import to_original_layout
from safetensors.torch import save_file

from slimdiff import single_file
from slimdiff.cli import main
from slimdiff.configs import (
    SDXL_SCHEDULER,
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    TINY_XL_TEXT,
    TINY_XL_TEXT_2,
    TINY_XL_UNET,
)
from slimdiff.errors import SlimDiffError
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.single_file import (
    UNET_PREFIX,
    ShippedConfig,
    _shipped,
    check_sdxl_text_towers,
    choose_config,
    detect_family,
    write_config_folder,
)
from slimdiff.tokenization import builtin_tokenizer, clip_bpe_tokenizer


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


def test_an_fp8_checkpoint_loads_upcast_and_slims_to_its_other_precision(tmp_path):
    """UNets shared in float8 (F8_E4M3, with norms and biases in fp16) load upcast, value for value; the dtype a slim
    UNet made from one is saved in (source_unet_dtype) is the checkpoint's other floating dtype: no float8 is written."""
    from slimdiff.sources import source_unet_dtype

    source = build_builtin("builtin:tiny")
    stored = {k: v.to(torch.float8_e4m3fn if k.startswith(UNET_PREFIX) and v.ndim >= 2 else torch.float16)
              for k, v in to_original_layout(source).items()}
    ckpt = tmp_path / "tiny-fp8.safetensors"
    save_file(stored, str(ckpt))
    loaded = load_pipeline(str(ckpt)).unet.state_dict()
    for name, value in source.unet.state_dict().items():  # a UNet tensor has the same rank in both layouts
        expected = value.to(torch.float8_e4m3fn if value.ndim >= 2 else torch.float16).float()
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], expected), name
    assert source_unet_dtype(str(ckpt)) == torch.float16


def test_an_inpainting_checkpoint_loads_offline_as_the_inpainting_pipeline(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    source = build_builtin("builtin:tiny")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        unet = UNet2DConditionModel(**dict(TINY_UNET, in_channels=9)).eval()
    source = StableDiffusionInpaintPipeline(**{**source.components, "unet": unet})
    ckpt = tmp_path / "tiny-inpainting.safetensors"
    save_file(to_original_layout(source), str(ckpt))
    loaded = load_pipeline(str(ckpt))
    assert type(loaded) is StableDiffusionInpaintPipeline and loaded.unet.config.in_channels == 9
    _assert_same_weights(loaded, source)


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



def test_a_slim_folder_reopens_its_source_with_the_config_it_was_slimmed_with(tmp_path, capsys):
    source = _tiny_sd2()  # no shipped configuration matches it: only --config can open the checkpoint
    source.save_pretrained(tmp_path / "config")
    ckpt = tmp_path / "tiny-v2.safetensors"
    save_file(to_original_layout(source, "open_clip"), str(ckpt))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "slim"
    assert main(["slim", "--model", str(ckpt), "--config", str(tmp_path / "config"), "--prompts", str(prompts),
                 "--num-prompts", "2", "--steps", "2", "--pass1-prompts", "1", "--budget", "0.3",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    info = json.loads((out / "slimdiff_plan.json").read_text())["info"]
    assert info["source_config"] == str((tmp_path / "config").resolve())
    reopened = load_pipeline(str(out))  # the slim UNet in the pipeline its checkpoint + config make
    assert reopened.scheduler.config.prediction_type == "v_prediction"
    assert reopened.unet.slim_plan.params_removed > 0

# builtin:tiny-xl with a wider second text encoder: diffusers' single-file loader tells SDXL's two text encoders
# apart by width (768 and 1280 in SDXL-base), and builtin:tiny-xl's are equally wide (32).
TINY_XL_WIDE = ShippedConfig(
    "tiny-xl, second text encoder 48 wide",
    unet=dict(TINY_XL_UNET, cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=48 + 6 * 8),
    text=TINY_XL_TEXT, vae=TINY_VAE, scheduler=SDXL_SCHEDULER,
    text_2=dict(TINY_XL_TEXT_2, hidden_size=48, intermediate_size=96, projection_dim=48))


def _tiny_sdxl():
    """A StableDiffusionXLPipeline of :data:`TINY_XL_WIDE`'s configuration, seeded weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(6)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_XL_WIDE.vae), unet=UNet2DConditionModel(**TINY_XL_WIDE.unet),
        scheduler=EulerDiscreteScheduler.from_config(TINY_XL_WIDE.scheduler),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_XL_WIDE.text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_XL_WIDE.text_2)),
        tokenizer=builtin_tokenizer(), tokenizer_2=builtin_tokenizer(), add_watermarker=False)


@pytest.fixture
def tiny_xl_shipped(monkeypatch):
    """:data:`TINY_XL_WIDE` shipped next to SDXL-base, so a tiny checkpoint takes the path a real one takes."""
    shipped = single_file._shipped
    monkeypatch.setattr(single_file, "_shipped", lambda: {**shipped(), "sdxl": [*shipped()["sdxl"], TINY_XL_WIDE]})


def test_sdxl_checkpoint_loads_offline_with_the_shipped_configuration(tmp_path, tiny_xl_shipped):
    source = _tiny_sdxl()
    save_file(to_original_layout(source, "sdxl"), str(tmp_path / "tiny-xl.safetensors"))
    loaded = load_pipeline(str(tmp_path / "tiny-xl.safetensors"))
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    _assert_same_weights(loaded, source, ("unet", "vae", "text_encoder", "text_encoder_2"))
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    settings = {k: v for k, v in SDXL_SCHEDULER.items() if k != "_class_name"}
    assert {k: loaded.scheduler.config[k] for k in settings} == settings
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(loaded, name)("a cat").input_ids == getattr(source, name)("a cat").input_ids
    assert loaded.config.force_zeros_for_empty_prompt


def test_an_sdxl_inpainting_checkpoint_loads_as_the_sdxl_inpainting_pipeline(tmp_path, tiny_xl_shipped):
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    base = _tiny_sdxl()
    source = StableDiffusionXLInpaintPipeline(**{**base.components, "unet": UNet2DConditionModel(
        **dict(TINY_XL_WIDE.unet, in_channels=9))}, add_watermarker=False)
    save_file(to_original_layout(source, "sdxl"), str(tmp_path / "tiny-xl-inpainting.safetensors"))
    loaded = load_pipeline(str(tmp_path / "tiny-xl-inpainting.safetensors"))
    assert type(loaded) is StableDiffusionXLInpaintPipeline and loaded.unet.config.in_channels == 9
    _assert_same_weights(loaded, source, ("unet", "vae", "text_encoder", "text_encoder_2"))


def test_sdxl_checkpoint_loads_with_a_config_folder(tmp_path):
    source = _tiny_sdxl()
    source.save_pretrained(tmp_path / "config")
    state = to_original_layout(source, "sdxl")
    assert detect_family({k: tuple(v.shape) for k, v in state.items()}, "x") == "sdxl"
    save_file(state, str(tmp_path / "tiny-xl.safetensors"))
    loaded = load_pipeline(str(tmp_path / "tiny-xl.safetensors"), config=str(tmp_path / "config"))
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    _assert_same_weights(loaded, source, ("unet", "vae", "text_encoder", "text_encoder_2"))


@pytest.mark.parametrize("with_config", [False, True], ids=["shipped", "config"])
def test_sdxl_refiner_checkpoint_loads_offline_as_the_refiner_pipeline(tmp_path, with_config):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    source = build_builtin("builtin:tiny-xl-refiner")
    ckpt = tmp_path / "tiny-xl-refiner.safetensors"
    save_file(to_original_layout(source, "sdxl_refiner"), str(ckpt))
    if with_config:  # the refiner's own folder in place of the shipped configuration
        source.save_pretrained(tmp_path / "config")
    loaded = load_pipeline(str(ckpt), config=str(tmp_path / "config") if with_config else None)
    assert type(loaded) is StableDiffusionXLImg2ImgPipeline
    assert loaded.text_encoder is None and loaded.tokenizer is None
    assert loaded.config.requires_aesthetics_score and not loaded.config.force_zeros_for_empty_prompt
    _assert_same_weights(loaded, source, ("unet", "vae", "text_encoder_2"))
    assert loaded.tokenizer_2("a cat").input_ids == source.tokenizer_2("a cat").input_ids
    # it refines as its source does: the aesthetic score among the time ids, an empty negative prompt encoded
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))

    def refined(pipe):
        return pipe("a red cube", image=image, strength=0.5, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(5), output_type="np").images[0]

    assert_draws_alike(refined(loaded), refined(source))


def _header_from_folder(folder, layout):
    """The header shapes of a full-size original-layout checkpoint of the configuration in ``folder``, from
    models built on the meta device (no memory, little time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))}
        if (folder / "text_encoder").is_dir():
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        if (folder / "text_encoder_2").is_dir():
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return {k: tuple(v.shape) for k, v in to_original_layout(SimpleNamespace(**parts), layout).items()}


@pytest.mark.parametrize("family, layout, expected", [
    ("sd1", "clip", "SD-1.5"), ("sd2", "open_clip", "SD-2.1 (768 px, v-prediction)"),
    ("sdxl", "sdxl", "SDXL-base 1.0"), ("sdxl-refiner", "sdxl_refiner", "SDXL-refiner 1.0")])
def test_full_size_checkpoints_find_their_shipped_configuration(tmp_path, family, layout, expected):
    shipped = {c.name: c for configs in _shipped().values() for c in configs}[expected]
    shapes = _header_from_folder(write_config_folder(shipped, tmp_path / "pipeline"), layout)
    assert detect_family(shapes, "ckpt") == family
    assert choose_config(shapes, family, "ckpt").name == expected
    if family == "sdxl":  # SDXL-base's UNet: 2.57 G parameters, 70 transformer blocks
        assert sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith(UNET_PREFIX)) == 2_567_463_684
        assert sum(k.endswith(".attn1.to_q.weight") for k in shapes) == 70
        check_sdxl_text_towers(shapes, "ckpt")
    if family == "sdxl-refiner":  # SDXL-refiner's UNet: 2.26 G parameters, 44 transformer blocks; bigG's 32 layers
        assert round(sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith(UNET_PREFIX)) / 1e6) == 2260
        assert sum(k.endswith(".attn1.to_q.weight") for k in shapes) == 44
        assert shapes["conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)


def test_sdxl_base_configuration_folder(tmp_path):
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = write_config_folder(_shipped()["sdxl"][0], tmp_path / "pipeline")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    components = {name for name, entry in index.items() if isinstance(entry, list)}
    assert components == {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
    assert all((folder / name).is_dir() for name in components)
    scheduler = EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    assert (scheduler.config.timestep_spacing, scheduler.config.steps_offset) == ("leading", 1)
    ids = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" in CLIP's vocabulary
    for name, pad in (("tokenizer", 49407), ("tokenizer_2", 0)):  # CLIP-L pads with EOS, OpenCLIP-bigG with "!"
        tokenizer = CLIPTokenizer.from_pretrained(folder / name)
        assert tokenizer("a photo of a cat", padding="max_length", max_length=9).input_ids == ids + [pad, pad]
    text_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    assert (text_2.hidden_size, text_2.projection_dim, text_2.eos_token_id) == (1280, 1280, 49407)


def test_sdxl_refiner_configuration_folder(tmp_path):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = write_config_folder(_shipped()["sdxl-refiner"][0], tmp_path / "pipeline")
    index = json.loads((folder / "model_index.json").read_text())
    # as stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json: no CLIP ViT-L tower
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == index["tokenizer"] == [None, None]
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    components = {name for name, entry in index.items() if isinstance(entry, list) and entry[0] is not None}
    assert components == {"unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"}
    assert all((folder / name).is_dir() for name in components) and not (folder / "text_encoder").exists()
    scheduler = EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    assert (scheduler.config.timestep_spacing, scheduler.config.steps_offset) == ("leading", 1)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")  # OpenCLIP-bigG pads with "!"
    ids = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" in CLIP's vocabulary
    assert tokenizer("a photo of a cat", padding="max_length", max_length=9).input_ids == ids + [0, 0]
    text_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    assert (text_2.hidden_size, text_2.num_hidden_layers, text_2.projection_dim) == (1280, 32, 1280)
    unet = UNet2DConditionModel.load_config(folder / "unet")
    assert unet["projection_class_embeddings_input_dim"] == 1280 + 5 * 256  # pooled text + five time ids
    assert AutoencoderKL.load_config(folder / "vae")["scaling_factor"] == 0.13025


def test_clip_tokenizer_is_clips():
    tokenizer = clip_bpe_tokenizer("<|endoftext|>")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cli_slims_a_single_file_checkpoint(tmp_path, capsys, tiny_xl_shipped, family):
    source, layout = (build_builtin("builtin:tiny"), "clip") if family == "sd1" else (_tiny_sdxl(), "sdxl")
    ckpt = tmp_path / f"tiny-{family}.safetensors"
    save_file(to_original_layout(source, layout), str(ckpt))
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
    pix2pix = dict(state)
    pix2pix[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(32, 8, 3, 3)
    save_file(pix2pix, str(tmp_path / "pix2pix.safetensors"))
    _fails(["slim", "--model", str(tmp_path / "pix2pix.safetensors"), *out], capsys, "8 input channels")
    wider = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    wider["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(514, 48)
    save_file(wider, str(tmp_path / "other.safetensors"))
    _fails(["slim", "--model", str(tmp_path / "other.safetensors"), *out], capsys, "matches none of the configurations")
    _fails(["slim", "--model", str(tmp_path / "other.safetensors"), "--config", str(tmp_path), *out], capsys,
           "no model_index.json")
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    _fails(["slim", "--model", str(tmp_path / "truncated.safetensors"), *out], capsys, "not a readable safetensors")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])  # as Black Forest Labs ship it; as ComfyUI saves it
def test_a_denoiser_without_its_pipeline_is_named_with_the_way_to_one(prefix, tmp_path, capsys):
    out = ["--budget", "0.3", "--out", str(tmp_path / "never")]
    flux = {f"{prefix}double_blocks.{i}.img_attn.qkv.weight": torch.zeros(6, 2) for i in range(3)}
    flux.update({f"{prefix}single_blocks.{i}.linear1.weight": torch.zeros(6, 2) for i in range(5)})
    flux[f"{prefix}img_in.weight"] = torch.zeros(2, 384)
    save_file(flux, str(tmp_path / "flux1-fill-dev.safetensors"))
    _fails(["slim", "--model", str(tmp_path / "flux1-fill-dev.safetensors"), *out], capsys,
           "is a FLUX transformer alone (Black Forest Labs' layout: 3 double- and 5 single-stream blocks; FLUX.1 Fill); "
           "slimdiff samples with the whole pipeline: pass the model's diffusers pipeline folder, these weights saved "
           "into its transformer/ with diffusers (FluxTransformer2DModel.from_single_file(")
    sd3 = {f"model.diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight": torch.zeros(6, 2) for i in range(4)}
    save_file(sd3, str(tmp_path / "sd3_medium.safetensors"))
    _fails(["slim", "--model", str(tmp_path / "sd3_medium.safetensors"), *out], capsys,
           "is an SD3 checkpoint (Stability's layout: 4 MMDiT blocks)")
    transformer = build_builtin("builtin:tiny-flux").transformer.state_dict()
    save_file({f"{prefix}{k}": v.contiguous() for k, v in transformer.items()}, str(tmp_path / "transformer.safetensors"))
    _fails(["slim", "--model", str(tmp_path / "transformer.safetensors"), *out], capsys,
           "not an original-layout Stable Diffusion checkpoint but a transformer's weights in diffusers' layout")
    assert not (tmp_path / "never").exists()


def test_sdxl_checkpoints_the_shipped_configurations_do_not_fit_say_why(tmp_path, capsys):
    out = ["--budget", "0.3", "--out", str(tmp_path / "never")]
    # builtin:tiny-xl's two text encoders are equally wide: diffusers would load the first into both
    save_file(to_original_layout(build_builtin("builtin:tiny-xl"), "sdxl"), str(tmp_path / "same-width.safetensors"))
    _fails(["slim", "--model", str(tmp_path / "same-width.safetensors"), *out], capsys, "both SDXL text encoders")
    assert not (tmp_path / "never").exists()
    # SDXL-base's widths without the 10th block of its six 10-deep stacks (distilled SDXL models are shallower)
    shapes = _header_from_folder(write_config_folder(_shipped()["sdxl"][0], tmp_path / "pipeline"), "sdxl")
    shallower = {k: s for k, s in shapes.items() if ".transformer_blocks.9." not in k}
    with pytest.raises(SlimDiffError, match="UNet transformer blocks 64,.*SDXL-base 1.0"):
        choose_config(shallower, "sdxl", "x")


def test_an_sdxl_refiner_inpainting_checkpoint_is_refused(tmp_path, capsys):
    state = to_original_layout(build_builtin("builtin:tiny-xl-refiner"), "sdxl_refiner")
    state[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(state, str(tmp_path / "refiner-inpainting.safetensors"))
    _fails(["slim", "--model", str(tmp_path / "refiner-inpainting.safetensors"), "--budget", "0.3", "--out",
            str(tmp_path / "never")], capsys, "SDXL refiner checkpoint with an inpainting UNet")
    assert not (tmp_path / "never").exists()
