"""Original-layout single-file checkpoints (``v1-5-pruned-emaonly.safetensors`` and the like), loaded offline.

diffusers' ``from_single_file`` converts the original keys (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*`` / ``conditioner.embedders.*``) itself, but takes the *configuration* of every component
from a diffusers folder, which it downloads from a hub unless one is given. Here the family is read from the
checkpoint's header (keys and shapes, no tensor data), a shipped configuration whose shapes match is written
to a temporary diffusers folder, and diffusers is handed that folder with ``local_files_only=True``. ``--config
DIR`` (a diffusers pipeline folder: ``model_index.json`` and component configs, weights not needed) replaces
the shipped configuration for checkpoints the project has none for.

Text encoders with CLIP's 49,408-token vocabulary get CLIP's byte-pair tokenizer, built from the vocabulary
file in ``assets/clip_bpe`` (MIT, see its NOTICE); the project's own tiny models use its character tokenizer.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SlimDiffError, SlimDiffWarning

ACCEPTED_MODELS = ("a built-in name (builtin:tiny, builtin:proxy, builtin:sd15-shape), a diffusers pipeline folder "
                   "(with model_index.json), an original-layout .safetensors checkpoint, or a slim folder written "
                   "by `slimdiff slim`")

# What a user most often passes by mistake, by suffix.
_KNOWN_SUFFIXES = {
    ".onnx": "an ONNX model (an export output, not a source model)",
    ".plan": "a TensorRT engine (an export output, not a source model)",
    ".engine": "a TensorRT engine (an export output, not a source model)",
    ".pt2": "an AOTInductor package (an export output, not a source model)",
    ".ckpt": "a pickle checkpoint (not loaded: unpickling can run code; convert it to .safetensors)",
    ".pt": "a pickle checkpoint (not loaded: unpickling can run code; convert it to .safetensors)",
    ".pth": "a pickle checkpoint (not loaded: unpickling can run code; convert it to .safetensors)",
    ".bin": "a pickle checkpoint (not loaded: unpickling can run code; convert it to .safetensors)",
    ".json": "a JSON file (pass the folder that holds it)",
    ".yaml": "a YAML file (an original training config is not needed: pass the checkpoint)",
}


def unsupported_file_message(source: str) -> str:
    """One line: what ``source`` is, and what ``--model`` accepts."""
    kind = _KNOWN_SUFFIXES.get(Path(source).suffix.lower(), f"a {Path(source).suffix or 'suffix-less'} file")
    return f"--model {source!r} is {kind}; --model takes {ACCEPTED_MODELS}"


# ----------------------------------------------------------------------------------------------------------
# Families and the configurations shipped for them
# ----------------------------------------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
CLIP_BPE = Path(__file__).parent / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
_CLIP_TOKEN_IDS = dict(bos_token_id=49406, eos_token_id=49407)

# The text-encoder token embedding of each layout: (family, key).
_TEXT_EMBEDDINGS = {
    "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "sd2": "cond_stage_model.model.token_embedding.weight",
    "sdxl": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
}
_SDXL_SECOND_TOWER = "conditioner.embedders.1.model.positional_embedding"
FAMILY_NAMES = {"sd1": "SD-1.x", "sd2": "SD-2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class ShippedConfig:
    """One family member the project has the diffusers configuration of."""

    name: str
    unet: dict
    text: dict
    vae: dict
    scheduler: dict
    pad_token: str = "<|endoftext|>"
    notes: str = ""  # an assumption the user should hear about when this configuration is chosen


def _sd_scheduler(**overrides) -> dict:
    return {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1,
            "set_alpha_to_one": False, **overrides}


def _shipped() -> dict[str, list[ShippedConfig]]:
    from .models import SD15_TEXT, SD15_UNET, SD15_VAE, TINY_TEXT, TINY_UNET, TINY_VAE

    sd15_text = {**SD15_TEXT, **_CLIP_TOKEN_IDS, "pad_token_id": 49407}
    # stabilityai/stable-diffusion-2-1 (768 px, v-prediction): the SD-2.x checkpoints most users have.
    sd21_unet = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                     use_linear_projection=True, upcast_attention=True)
    sd21_text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                     pad_token_id=1, **_CLIP_TOKEN_IDS)
    return {
        "sd1": [ShippedConfig("SD-1.5", SD15_UNET, sd15_text, SD15_VAE, _sd_scheduler()),
                ShippedConfig("builtin:tiny", TINY_UNET, TINY_TEXT, TINY_VAE, _sd_scheduler())],
        "sd2": [ShippedConfig("SD-2.1 (768 px, v-prediction)", sd21_unet, sd21_text, dict(SD15_VAE, sample_size=768),
                              _sd_scheduler(prediction_type="v_prediction"), pad_token="!",
                              notes="SD-2.x checkpoints are read as v-prediction models (SD-2.0-v, 2.1); an "
                                    "epsilon model (SD-2.x base, 512 px) needs --config")],
        "sdxl": [],
    }


# ----------------------------------------------------------------------------------------------------------
# Reading the checkpoint
# ----------------------------------------------------------------------------------------------------------


def read_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, without reading tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except SafetensorError as exc:
        raise SlimDiffError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None


def detect_family(shapes: dict[str, tuple[int, ...]], source: str) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` from the checkpoint's keys; one line naming what was found otherwise."""
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        example = next(iter(sorted(shapes)), "none")
        raise SlimDiffError(f"{source!r} is not an original-layout Stable Diffusion checkpoint (no {UNET_PREFIX}* "
                            f"keys; first key: {example}); a diffusers UNet file is loaded from its folder")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        raise SlimDiffError(f"{source!r} is a UNet with {conv_in[1]} input channels (an inpainting or other "
                            "image-conditioned model); only text-to-image models with 4 latent channels are supported")
    if _SDXL_SECOND_TOWER in shapes and _TEXT_EMBEDDINGS["sdxl"] in shapes:
        return "sdxl"
    if "conditioner.embedders.0.model.text_projection" in shapes:
        raise SlimDiffError(f"{source!r} is an SDXL refiner checkpoint; only SDXL base models are supported")
    for family in ("sd2", "sd1"):
        if _TEXT_EMBEDDINGS[family] in shapes:
            return family
    raise SlimDiffError(f"{source!r} holds a UNet but no text encoder this project knows (CLIP under "
                        "cond_stage_model.transformer.*, OpenCLIP under cond_stage_model.model.*, or SDXL's "
                        "conditioner.embedders.*)")


def _cross_attention_dim(shapes: dict[str, tuple[int, ...]]) -> int | None:
    keys = sorted(k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    return shapes[keys[0]][1] if keys else None


def _probe(shapes: dict[str, tuple[int, ...]], family: str) -> dict:
    """The few numbers that tell family members apart."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (None,))
    vocab, hidden = shapes[_TEXT_EMBEDDINGS[family]]
    return {"UNet width": conv_in[0], "cross-attention width": _cross_attention_dim(shapes),
            "text vocabulary": vocab, "text width": hidden}


def _expected_probe(config: ShippedConfig) -> dict:
    return {"UNet width": config.unet["block_out_channels"][0],
            "cross-attention width": config.unet["cross_attention_dim"],
            "text vocabulary": config.text["vocab_size"], "text width": config.text["hidden_size"]}


def choose_config(shapes: dict[str, tuple[int, ...]], family: str, source: str) -> ShippedConfig:
    """The shipped configuration whose shapes match the checkpoint; one line naming both otherwise."""
    found = _probe(shapes, family)
    candidates = _shipped()[family]
    for config in candidates:
        if _expected_probe(config) == found:
            return config
    names = ", ".join(c.name for c in candidates) or "none yet"
    described = ", ".join(f"{k} {v}" for k, v in found.items())
    raise SlimDiffError(f"{source!r} is an {FAMILY_NAMES[family]} checkpoint ({described}) that matches none of "
                        f"the configurations shipped for that family ({names}); pass --config DIR with its "
                        "diffusers configuration folder (model_index.json and component configs)")


# ----------------------------------------------------------------------------------------------------------
# Writing a configuration folder
# ----------------------------------------------------------------------------------------------------------


def _clip_bpe_tokenizer(pad_token: str):
    """CLIP's tokenizer (the vocabulary of openai/clip-vit-large-patch14) from the shipped BPE merges."""
    from transformers import CLIPTokenizer

    from .models import byte_alphabet

    lines = gzip.open(CLIP_BPE, "rt", encoding="utf-8").read().split("\n")
    # CLIP's own cut: the vocabulary is 256 bytes, their end-of-word forms, 48,894 merges and 2 special tokens
    merges = lines[1: CLIP_VOCAB_SIZE - 2 * 256 - 2 + 1]
    alphabet = byte_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m.split()) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77,
                             pad_token=pad_token)


def _tokenizer_for(text: dict, pad_token: str):
    from .models import builtin_tokenizer

    if text["vocab_size"] == CLIP_VOCAB_SIZE:
        return _clip_bpe_tokenizer(pad_token)
    return builtin_tokenizer()


def write_config_folder(config: ShippedConfig, folder: Path) -> Path:
    """A diffusers ``StableDiffusionPipeline`` folder with every config and the tokenizer, no weights."""
    import diffusers
    from transformers import CLIPTextConfig

    folder.mkdir(parents=True, exist_ok=True)
    scheduler = dict(config.scheduler)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", scheduler["_class_name"]], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    components = {"unet": {"_class_name": "UNet2DConditionModel", **config.unet},
                  "vae": {"_class_name": "AutoencoderKL", **config.vae}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    for name, body in components.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(body, indent=1), encoding="utf-8")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1), encoding="utf-8")
    CLIPTextConfig(**config.text).save_pretrained(folder / "text_encoder")
    _tokenizer_for(config.text, config.pad_token).save_pretrained(folder / "tokenizer")
    return folder


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def load_single_file(path: str | Path, dtype: torch.dtype = torch.float32, config: str | Path | None = None):
    """A pipeline from an original-layout ``.safetensors`` checkpoint, with no network.

    ``config``: a diffusers pipeline folder to take the configuration from instead of the shipped ones.
    """
    path = Path(path)
    shapes = read_header(path)
    family = detect_family(shapes, str(path))
    cls = _pipeline_class(family)
    kwargs = dict(torch_dtype=dtype, local_files_only=True, safety_checker=None)
    if family != "sdxl":
        kwargs["requires_safety_checker"] = False
    try:
        if config is not None:
            if not (Path(config) / "model_index.json").is_file():
                raise SlimDiffError(f"--config {str(config)!r} is not a diffusers pipeline folder (no model_index.json)")
            return cls.from_single_file(str(path), config=str(Path(config).resolve()), **kwargs)
        shipped = choose_config(shapes, family, str(path))
        if shipped.notes:
            warnings.warn(f"{path.name}: configuration {shipped.name}: {shipped.notes}", SlimDiffWarning, stacklevel=2)
        with tempfile.TemporaryDirectory(prefix="slimdiff-config-") as tmp:
            folder = write_config_folder(shipped, Path(tmp) / "pipeline")
            return cls.from_single_file(str(path), config=str(folder), **kwargs)
    except SlimDiffError:
        raise
    except Exception as exc:  # diffusers' conversion raises assorted types on checkpoints that do not fit
        hint = "" if config is not None else "; pass --config DIR with the model's diffusers configuration"
        raise SlimDiffError(f"could not load {FAMILY_NAMES[family]} checkpoint {str(path)!r}: "
                            f"{' '.join(str(exc).split())[:300]}{hint}") from exc
