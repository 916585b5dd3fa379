"""Original-layout single-file checkpoints (``v1-5-pruned-emaonly.safetensors`` and the like), loaded offline.

diffusers' ``from_single_file`` converts the original keys (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*`` / ``conditioner.embedders.*``) itself, but takes the *configuration* of every component
from a diffusers folder, which it downloads from a hub unless one is given. Here the family is read from the
checkpoint's header (keys and shapes, no tensor data), a shipped configuration whose shapes match is written
to a temporary diffusers folder, and diffusers is handed that folder with ``local_files_only=True``. ``--config
DIR`` (a diffusers pipeline folder: ``model_index.json`` and component configs, weights not needed) replaces
the shipped configuration for checkpoints the project has none for.

Shipped: SD-1.5, SD-2.1 (768 px, v-prediction), SDXL-base 1.0 and SDXL-refiner 1.0 (:mod:`slimdiff.configs`),
plus ``builtin:tiny`` and ``builtin:tiny-xl-refiner``. Text encoders with CLIP's 49,408-token vocabulary get CLIP's
byte-pair tokenizer (:func:`slimdiff.tokenization.clip_bpe_tokenizer`); the project's own tiny models use its
character tokenizer.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .configs import (
    CLIP_TOKEN_IDS,
    CLIP_VOCAB_SIZE,
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SD21_TEXT,
    SD21_UNET,
    SD21_VAE,
    SD_SCHEDULER,
    SDXL_REFINER_UNET,
    SDXL_SCHEDULER,
    SDXL_TEXT,
    SDXL_TEXT_2,
    SDXL_UNET,
    SDXL_VAE,
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    TINY_XL_REFINER_UNET,
    TINY_XL_TEXT_2,
)
from .errors import SlimDiffError, SlimDiffWarning
from .tokenization import builtin_tokenizer, clip_bpe_tokenizer

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

# The token embedding of each family's text_encoder: (family, key). The SDXL refiner has none.
_TEXT_EMBEDDINGS = {
    "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "sd2": "cond_stage_model.model.token_embedding.weight",
    "sdxl": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
}
# The positional embedding, (77, width), of each family's text_encoder_2: SDXL's OpenCLIP ViT-bigG, the base's
# second embedder and the refiner's only one.
_TEXT_2_EMBEDDINGS = {
    "sdxl": "conditioner.embedders.1.model.positional_embedding",
    "sdxl-refiner": "conditioner.embedders.0.model.positional_embedding",
}
FAMILY_NAMES = {"sd1": "SD-1.x", "sd2": "SD-2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}


@dataclass(frozen=True)
class ShippedConfig:
    """One family member the project has the diffusers configuration of."""

    name: str
    unet: dict
    text: dict | None  # None for the SDXL refiner, conditioned on its text_2 alone
    vae: dict
    scheduler: dict  # scheduler_config.json form, ``_class_name`` included
    pad_token: str = "<|endoftext|>"
    text_2: dict | None = None  # SDXL's second text encoder (a CLIPTextModelWithProjection)
    pad_token_2: str = "!"  # OpenCLIP pads with "!" (token 0)
    notes: str = ""  # an assumption the user should hear about when this configuration is chosen

    @property
    def pipeline_class(self) -> str:
        return _pipeline_class_name(self.text is not None, self.text_2 is not None,
                                    self.unet.get("in_channels") == INPAINTING_CHANNELS)


#: conv_in's input channels of an inpainting UNet: the latent (4), the mask (1), the masked image's latent (4).
INPAINTING_CHANNELS = 9


def _pipeline_class_name(text: bool, text_2: bool, inpainting: bool) -> str:
    """The pipeline of a model with a ``text_encoder`` and/or a ``text_encoder_2``."""
    if not text:  # the SDXL refiner, an image-to-image model (detect_family refuses an inpainting refiner)
        return "StableDiffusionXLImg2ImgPipeline"
    return f"StableDiffusion{'XL' if text_2 else ''}{'Inpaint' if inpainting else ''}Pipeline"


def _clip_tokenized(text: dict, pad_token_id: int) -> dict:
    """A text-encoder configuration read through CLIP's BPE tokenizer (the shape constants keep the character
    tokenizer's ids, which the seeded built-ins use)."""
    return {**text, **CLIP_TOKEN_IDS, "pad_token_id": pad_token_id}


def _shipped() -> dict[str, list[ShippedConfig]]:
    return {
        "sd1": [ShippedConfig("SD-1.5", SD15_UNET, _clip_tokenized(SD15_TEXT, 49407), SD15_VAE, SD_SCHEDULER),
                ShippedConfig("builtin:tiny", TINY_UNET, TINY_TEXT, TINY_VAE, SD_SCHEDULER)],
        "sd2": [ShippedConfig("SD-2.1 (768 px, v-prediction)", SD21_UNET, SD21_TEXT, SD21_VAE,
                              {**SD_SCHEDULER, "prediction_type": "v_prediction"}, pad_token="!",
                              notes="SD-2.x checkpoints are read as v-prediction models (SD-2.0-v, 2.1); an "
                                    "epsilon model (SD-2.x base, 512 px) needs --config")],
        # SDXL-base 1.0: CLIP ViT-L pads with <|endoftext|>, OpenCLIP bigG with "!" (as its tokenizer_2 does).
        # (builtin:tiny-xl is not among them: its two text encoders are equally wide, see check_sdxl_text_towers.)
        "sdxl": [ShippedConfig("SDXL-base 1.0", SDXL_UNET, _clip_tokenized(SDXL_TEXT, 49407), SDXL_VAE,
                               SDXL_SCHEDULER, text_2=_clip_tokenized(SDXL_TEXT_2, 0))],
        # SDXL-refiner 1.0: SDXL-base's OpenCLIP bigG tower (padding with "!"), VAE and scheduler, without CLIP ViT-L;
        # builtin:tiny-xl-refiner too (its one text tower leaves the single-file loader nothing to mix up).
        "sdxl-refiner": [ShippedConfig("SDXL-refiner 1.0", SDXL_REFINER_UNET, None, SDXL_VAE, SDXL_SCHEDULER,
                                       text_2=_clip_tokenized(SDXL_TEXT_2, 0)),
                         ShippedConfig("builtin:tiny-xl-refiner", TINY_XL_REFINER_UNET, None, TINY_VAE,
                                       SDXL_SCHEDULER, text_2=TINY_XL_TEXT_2)],
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


def input_channels(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The UNet's input channels: 4 (the latent) for text-to-image, 9 for inpainting."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return None if conv_in is None else conv_in[1]


# What FLUX.1's first input layer takes, per token: the packed latent, with the masked image and mask (Fill) or the
# control image (Depth / Canny) beside it.
_FLUX_INPUT_FEATURES = {64: "text-to-image: FLUX.1-dev or schnell", 128: "FLUX.1 Control", 384: "FLUX.1 Fill"}


def _block_count(keys: set[str], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def _refuse_denoiser_alone(shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """One line naming a checkpoint that holds a denoiser without the rest of its pipeline — how FLUX and SD3
    fine-tunes are shared (Black Forest Labs' and Stability's layouts), or a diffusers weights file taken out of
    its folder — and how to bring it to a pipeline folder, which is what slimdiff samples with."""
    keys = {k.removeprefix(UNET_PREFIX) for k in shapes}
    if "double_blocks.0.img_attn.qkv.weight" in keys:
        features = next((shape[1] for k, shape in shapes.items() if k.endswith("img_in.weight")), None)
        kind = _FLUX_INPUT_FEATURES.get(features, f"{features} input features per token")
        what = (f"a FLUX transformer alone (Black Forest Labs' layout: {_block_count(keys, 'double_blocks.')} double- "
                f"and {_block_count(keys, 'single_blocks.')} single-stream blocks; {kind})")
        model_class = "FluxTransformer2DModel"
    elif "joint_blocks.0.x_block.attn.qkv.weight" in keys:
        what = f"an SD3 checkpoint (Stability's layout: {_block_count(keys, 'joint_blocks.')} MMDiT blocks)"
        model_class = "SD3Transformer2DModel"
    elif "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        what = "a UNet's weights in diffusers' layout (unet/diffusion_pytorch_model.safetensors)"
        model_class = None
    elif any(k.startswith(("transformer_blocks.0.attn.to_q.", "single_transformer_blocks.")) for k in keys):
        what = "a transformer's weights in diffusers' layout (transformer/diffusion_pytorch_model.safetensors)"
        model_class = None
    else:
        return
    if model_class is None:
        raise SlimDiffError(f"{source!r} is not an original-layout Stable Diffusion checkpoint but {what}: pass the "
                            "diffusers pipeline folder it belongs to")
    raise SlimDiffError(f"{source!r} is {what}; slimdiff samples with the whole pipeline: pass the model's diffusers "
                        f"pipeline folder, these weights saved into its transformer/ with diffusers "
                        f"({model_class}.from_single_file(FILE, config=FOLDER, subfolder='transformer')"
                        f".save_pretrained(FOLDER/transformer))")


def detect_family(shapes: dict[str, tuple[int, ...]], source: str) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` / ``sdxl-refiner`` from the checkpoint's keys; one line naming what was found
    otherwise."""
    _refuse_denoiser_alone(shapes, source)
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        example = next(iter(sorted(shapes)), "none")
        raise SlimDiffError(f"{source!r} is not an original-layout Stable Diffusion checkpoint (no {UNET_PREFIX}* "
                            f"keys; first key: {example}); a diffusers UNet file is loaded from its folder")
    channels = input_channels(shapes)
    if channels not in (None, 4, INPAINTING_CHANNELS):
        raise SlimDiffError(f"{source!r} is a UNet with {channels} input channels (an image-conditioned model such as "
                            "InstructPix2Pix or SD-2 depth); only text-to-image (4) and inpainting (9) UNets are "
                            "supported")
    if _TEXT_2_EMBEDDINGS["sdxl"] in shapes and _TEXT_EMBEDDINGS["sdxl"] in shapes:
        return "sdxl"
    if _TEXT_2_EMBEDDINGS["sdxl-refiner"] in shapes:
        if channels == INPAINTING_CHANNELS:  # as refiner folders are refused (slimdiff.models)
            raise SlimDiffError(f"{source!r} is an SDXL refiner checkpoint with an inpainting UNet; slimdiff knows "
                                "the refiner as an image-to-image model only")
        return "sdxl-refiner"
    for family in ("sd2", "sd1"):
        if _TEXT_EMBEDDINGS[family] in shapes:
            return family
    raise SlimDiffError(f"{source!r} holds a UNet but no text encoder this project knows (CLIP under "
                        "cond_stage_model.transformer.*, OpenCLIP under cond_stage_model.model.*, or SDXL's "
                        "conditioner.embedders.*)")


def check_sdxl_text_towers(shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse SDXL checkpoints whose two text encoders are equally wide: diffusers' single-file loader gives each
    text encoder the tower whose position embedding is as wide as it is, so it would silently load the first
    tower into both (SDXL's are 768 and 1280 wide)."""
    first, second = shapes[_TEXT_EMBEDDINGS["sdxl"]][-1], shapes[_TEXT_2_EMBEDDINGS["sdxl"]][-1]
    if first == second:
        raise SlimDiffError(f"{source!r}: both SDXL text encoders are {first} wide, and diffusers' single-file "
                            "loader tells them apart by width only (it would load the first into both); load "
                            "this model from a diffusers pipeline folder instead")


def _cross_attention_dim(shapes: dict[str, tuple[int, ...]]) -> int | None:
    keys = sorted(k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    return shapes[keys[0]][1] if keys else None


def _probe(shapes: dict[str, tuple[int, ...]], family: str) -> dict:
    """The few numbers that tell family members apart (SDXL-base and its distilled cousins differ in depth only)."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (None,))
    # every transformer block has one self-attention query projection, under the same name in both layouts
    blocks = sum(1 for k in shapes if k.startswith(UNET_PREFIX) and k.endswith(".attn1.to_q.weight"))
    found = {"UNet width": conv_in[0], "UNet transformer blocks": blocks,
             "cross-attention width": _cross_attention_dim(shapes)}
    if family in _TEXT_EMBEDDINGS:
        found["text vocabulary"], found["text width"] = shapes[_TEXT_EMBEDDINGS[family]]
    if family in _TEXT_2_EMBEDDINGS:
        found["text_encoder_2 width"] = shapes[_TEXT_2_EMBEDDINGS[family]][-1]
    return found


def _transformer_blocks(unet: dict) -> int:
    """How many transformer blocks diffusers' ``UNet2DConditionModel(**unet)`` has."""
    levels = len(unet["down_block_types"])
    depth = unet.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    layers, up_depth = unet["layers_per_block"], depth[::-1]
    down = sum(layers * d for kind, d in zip(unet["down_block_types"], depth) if kind.startswith("CrossAttn"))
    up = sum((layers + 1) * d for kind, d in zip(unet["up_block_types"], up_depth) if kind.startswith("CrossAttn"))
    mid = depth[-1] if unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn" else 0
    return down + mid + up


def _expected_probe(config: ShippedConfig) -> dict:
    expected = {"UNet width": config.unet["block_out_channels"][0],
                "UNet transformer blocks": _transformer_blocks(config.unet),
                "cross-attention width": config.unet["cross_attention_dim"]}
    if config.text is not None:
        expected["text vocabulary"], expected["text width"] = config.text["vocab_size"], config.text["hidden_size"]
    if config.text_2 is not None:
        expected["text_encoder_2 width"] = config.text_2["hidden_size"]
    return expected


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


def _tokenizer_for(text: dict, pad_token: str):
    if text["vocab_size"] == CLIP_VOCAB_SIZE:
        return clip_bpe_tokenizer(pad_token)
    return builtin_tokenizer()


def write_config_folder(config: ShippedConfig, folder: Path) -> Path:
    """A diffusers pipeline folder (``StableDiffusionPipeline``; with a second text encoder,
    ``StableDiffusionXLPipeline``; with the second alone, the refiner's ``StableDiffusionXLImg2ImgPipeline``) with
    every config and the tokenizers, no weights."""
    import diffusers
    from transformers import CLIPTextConfig

    folder.mkdir(parents=True, exist_ok=True)
    scheduler = dict(config.scheduler)
    # component folder → (class, text config, pad token); SDXL's second tower is read through its projection
    text_encoders = {}
    if config.text is not None:
        text_encoders["text_encoder"] = ("CLIPTextModel", config.text, config.pad_token)
    if config.text_2 is not None:
        text_encoders["text_encoder_2"] = ("CLIPTextModelWithProjection", config.text_2, config.pad_token_2)
    index = {"_class_name": config.pipeline_class, "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", scheduler["_class_name"]]}
    for name, (cls, _, _) in text_encoders.items():
        index[name] = ["transformers", cls]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    if config.text_2 is None:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    elif config.text is None:
        # SDXL-refiner's model_index.json: five time ids (with the aesthetic score), an empty negative prompt encoded
        # rather than zeros
        index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True,
                     force_zeros_for_empty_prompt=False)
    else:
        index["force_zeros_for_empty_prompt"] = True  # SDXL-base's model_index.json
    components = {"unet": {"_class_name": "UNet2DConditionModel", **config.unet},
                  "vae": {"_class_name": "AutoencoderKL", **config.vae}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    for name, body in components.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(body, indent=1), encoding="utf-8")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1), encoding="utf-8")
    for name, (_, text, pad_token) in text_encoders.items():
        CLIPTextConfig(**text).save_pretrained(folder / name)
        _tokenizer_for(text, pad_token).save_pretrained(folder / name.replace("text_encoder", "tokenizer"))
    return folder


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def _pipeline_class(family: str, inpainting: bool):
    import diffusers

    return getattr(diffusers, _pipeline_class_name(family in _TEXT_EMBEDDINGS, family in _TEXT_2_EMBEDDINGS,
                                                   inpainting))


def load_single_file(path: str | Path, dtype: torch.dtype = torch.float32, config: str | Path | None = None):
    """A pipeline from an original-layout ``.safetensors`` checkpoint, with no network.

    ``config``: a diffusers pipeline folder to take the configuration from instead of the shipped ones.
    """
    path = Path(path)
    shapes = read_header(path)
    family = detect_family(shapes, str(path))
    if family == "sdxl":
        check_sdxl_text_towers(shapes, str(path))
    inpainting = input_channels(shapes) == INPAINTING_CHANNELS
    cls = _pipeline_class(family, inpainting)
    kwargs = dict(torch_dtype=dtype, local_files_only=True)
    if family in _TEXT_2_EMBEDDINGS:  # SDXL (base or refiner), as its folders load (slimdiff.models): no watermark
        kwargs["add_watermarker"] = False
    else:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        if config is not None:
            if not (Path(config) / "model_index.json").is_file():
                raise SlimDiffError(f"--config {str(config)!r} is not a diffusers pipeline folder (no model_index.json)")
            return cls.from_single_file(str(path), config=str(Path(config).resolve()), **kwargs)
        shipped = choose_config(shapes, family, str(path))
        if inpainting:  # the text-to-image configuration, with the inpainting UNet's input
            shipped = replace(shipped, unet={**shipped.unet, "in_channels": INPAINTING_CHANNELS})
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
