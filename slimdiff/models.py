"""Model loading (the map of compressible modules lives in :mod:`slimdiff.families`).

Every model is a diffusers ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` (and the SDXL refiner's
``StableDiffusionXLImg2ImgPipeline``), PixArt pipeline
(``PixArtSigmaPipeline``, ``PixArtAlphaPipeline``), ``StableDiffusion3Pipeline``, ``FluxPipeline`` (and FLUX
Fill's ``FluxFillPipeline``, FLUX Control's ``FluxControlPipeline``, FLUX Kontext's ``FluxKontextPipeline``), or a bare
``UNet2DConditionModel``. Sources:

* ``builtin:tiny`` — a small SD-1.x-shaped pipeline with seeded random weights; runs in seconds on a CPU.
* ``builtin:proxy`` — the project's own small text-to-image model, trained from scratch on procedural shape
  scenes (``slimdiff/proxy``); real, trained weights, so quality can be measured in-house.
* ``builtin:sd15-shape`` — the exact SD v1.5 UNet / text encoder / VAE configurations with seeded random
  weights, for export and latency work at real scale. Its tokenizer is the project's own character-level one
  (token ids only have to be valid for random weights; single-file checkpoints get CLIP's BPE tokenizer from
  ``assets/clip_bpe``); the text embedding table keeps CLIP's 49,408 rows.
* ``builtin:tiny-xl`` — a small ``StableDiffusionXLPipeline`` (two text encoders, the second with a projection;
  ``addition_embed_type="text_time"``; ``transformer_layers_per_block=(1, 1, 2)``) with seeded random weights.
* ``builtin:sdxl-shape`` — the exact public SDXL-base 1.0 UNet / CLIP-L + OpenCLIP-bigG text encoders / VAE
  configurations with seeded random weights (about 14 GB in float32, 10 GB of it the UNet), for export and
  latency work at real scale; tokenizers are the character-level one, as for ``sd15-shape``. Where only shapes
  matter (MAC counts) build it on the meta device: ``build_builtin("builtin:sdxl-shape", device="meta")``.
* ``builtin:tiny-xl-refiner`` — a small SDXL refiner: a ``StableDiffusionXLImg2ImgPipeline`` with only the second
  text tower (tiny-xl's), aesthetic-score time ids (five) and attention at its two middle levels, seeded weights.
* ``builtin:sdxl-refiner-shape`` — the exact public SDXL-refiner 1.0 UNet (2.26 B parameters), OpenCLIP-bigG text
  tower and VAE configurations with seeded random weights; build it on the meta device where only shapes matter.
* ``builtin:tiny-pixart`` — a small ``PixArtSigmaPipeline`` with seeded random weights: a two-block
  ``PixArtTransformer2DModel`` (adaLN-single, learned sigma), a two-layer T5 v1.1 encoder behind the
  character-level tokenizer, the tiny VAE and PixArt-Σ's DPM-Solver++ scheduler. Its latent is 16×16 (32 px
  images), outside PixArt's aspect-ratio bins: call it with ``use_resolution_binning=False``.
* ``builtin:pixart-sigma-shape`` — the exact public PixArt-Σ-XL-2-1024-MS transformer (28 blocks, 16 heads of
  72), T5 v1.1 XXL encoder and SDXL VAE configurations with seeded random weights (about 22 GB in float32: the
  transformer 0.61 B parameters, the T5 4.76 B, the VAE 0.08 B); character-level tokenizer, as for
  ``sdxl-shape``. Build it on the meta device where only shapes matter:
  ``build_builtin("builtin:pixart-sigma-shape", device="meta")``.
* ``builtin:tiny-sd3`` — a small ``StableDiffusion3Pipeline`` with seeded random weights: a two-block
  ``SD3Transformer2DModel`` (MMDiT, the last block context-pre-only), tiny-xl's two CLIP towers (with projections),
  a T5 v1.1 encoder behind the character-level tokenizer, the tiny VAE with 16 latent channels and SD3's
  flow-matching Euler scheduler (shift 3). Its latent is 16×16 (32 px images).
* ``builtin:sd3-medium-shape`` — the exact public Stable Diffusion 3 medium transformer (24 MMDiT blocks, 24 heads of
  64; the configuration diffusers' SD3 converter writes, see :mod:`slimdiff.configs`), CLIP-L and OpenCLIP-bigG
  text towers with projections, T5 v1.1 XXL and the 16-channel VAE, with seeded random weights (the transformer
  2.0 B parameters, the T5 4.76 B); character-level tokenizers. Build it on the meta device where only shapes
  matter: ``build_builtin("builtin:sd3-medium-shape", device="meta")``.
* ``builtin:tiny-flux`` — a small ``FluxPipeline`` with seeded random weights: a ``FluxTransformer2DModel`` of two
  double-stream and two single-stream blocks with FLUX.1-dev's guidance embedding, builtin:tiny's CLIP tower, a T5
  v1.1 encoder behind the character-level tokenizer, the tiny VAE with 16 latent channels and FLUX's flow-matching
  Euler scheduler (dynamic shift). Its latent is 16×16 (32 px images), packed to 64 tokens.
* ``builtin:flux-dev-shape`` — the exact public FLUX.1-dev transformer (19 double-stream and 38 single-stream
  blocks, 24 heads of 128, guidance embedding; see :mod:`slimdiff.configs`), CLIP-L and T5 v1.1 XXL text towers and
  the 16-channel VAE, with seeded random weights (the transformer 11.9 B parameters); character-level tokenizers.
  Build it on the meta device: ``build_builtin("builtin:flux-dev-shape", device="meta")``.
* ``builtin:tiny-flux-fill`` — builtin:tiny-flux as a ``FluxFillPipeline``: its transformer's tokens carry the latent,
  the masked image's latent and the mask (144 features in, 64 out), seeded weights of their own.
* ``builtin:flux-fill-shape`` — the exact public FLUX.1-Fill-dev transformer (FLUX.1-dev's with 384 input features)
  and FLUX.1-dev's text towers and VAE, seeded random weights; build it on the meta device where only shapes matter.
* ``builtin:tiny-flux-control`` — builtin:tiny-flux as a ``FluxControlPipeline``: its transformer's tokens carry the
  latent and the control image's latent (128 features in, 64 out), seeded weights of their own.
* ``builtin:tiny-flux-kontext`` — builtin:tiny-flux's components as a ``FluxKontextPipeline``: a transformer of
  builtin:tiny-flux's configuration (Kontext's is FLUX.1-dev's) with seeded weights of its own, called with the
  reference image's tokens after the latent's.
* ``builtin:tiny-flux-controlnet`` — builtin:tiny-flux as a ``FluxControlNetPipeline`` (its transformer, the same
  weights) with a seeded ``FluxControlNetModel`` of one double- and one single-stream block: ``from_transformer``'s
  weights, its zero-initialised projections drawn at random so that its samples move the image.
* ``builtin:flux-kontext-shape`` — FLUX.1-dev's shapes (FLUX.1-Kontext-dev's transformer has its configuration) as a
  ``FluxKontextPipeline``, seeded random weights; build it on the meta device where only shapes matter.
* a local diffusers folder (a pipeline folder with ``unet/`` or ``transformer/``, or a UNet folder with
  ``config.json``);
* a single ``.safetensors`` checkpoint (original SD layout, via ``from_single_file``);
* a Hugging Face Hub id (``owner/name``) of a model already in this machine's Hugging Face cache
  (:mod:`slimdiff.hub_cache`).

Nothing here reaches for a model hub.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .configs import (
    FLUX_DEV_TRANSFORMER,
    FLUX_FILL_DEV_TRANSFORMER,
    FLUX_SCHEDULER,
    FLUX_TEXT,
    FLUX_TEXT_2,
    FLUX_VAE,
    PIXART_SCHEDULER,
    PIXART_SIGMA_TEXT,
    PIXART_SIGMA_TRANSFORMER,
    PIXART_SIGMA_VAE,
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SD3_MEDIUM_TRANSFORMER,
    SD3_SCHEDULER,
    SD3_TEXT,
    SD3_TEXT_2,
    SD3_TEXT_3,
    SD3_VAE,
    SD_SCHEDULER,
    SDXL_SCHEDULER,
    SDXL_TEXT,
    SDXL_REFINER_UNET,
    SDXL_TEXT_2,
    SDXL_UNET,
    SDXL_VAE,
    TINY_FLUX_CONTROL_TRANSFORMER,
    TINY_FLUX_FILL_TRANSFORMER,
    TINY_FLUX_TEXT,
    TINY_FLUX_TEXT_2,
    TINY_FLUX_TRANSFORMER,
    TINY_FLUX_VAE,
    TINY_PIXART_TEXT,
    TINY_PIXART_TRANSFORMER,
    TINY_SD3_TEXT,
    TINY_SD3_TEXT_2,
    TINY_SD3_TEXT_3,
    TINY_SD3_TRANSFORMER,
    TINY_SD3_VAE,
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    TINY_XL_TEXT,
    TINY_XL_REFINER_UNET,
    TINY_XL_TEXT_2,
    TINY_XL_UNET,
)
from .errors import SlimDiffError

# The map of compressible modules moved to the block adapters; these names stay importable from here.
from .families import FFN, QK, VO, ModuleSite, family_for, module_sites  # noqa: F401
from .hub_cache import missing_message, resolve_model_source
from .tokenization import builtin_tokenizer

if TYPE_CHECKING:
    from .lora import LoraSpec

BUILTINS = ("builtin:tiny", "builtin:sd15-shape", "builtin:proxy", "builtin:tiny-xl", "builtin:sdxl-shape",
            "builtin:tiny-xl-refiner", "builtin:sdxl-refiner-shape",
            "builtin:tiny-pixart", "builtin:pixart-sigma-shape", "builtin:tiny-sd3", "builtin:sd3-medium-shape",
            "builtin:tiny-flux", "builtin:flux-dev-shape", "builtin:tiny-flux-fill", "builtin:flux-fill-shape",
            "builtin:tiny-flux-control", "builtin:tiny-flux-kontext", "builtin:flux-kontext-shape",
            "builtin:tiny-flux-controlnet")
ASSETS = Path(__file__).parent / "assets"

# ----------------------------------------------------------------------------------------------------------
# Built-in models (their configurations are in :mod:`slimdiff.configs`)
# ----------------------------------------------------------------------------------------------------------

#: The denoiser configuration of each seeded built-in (what shape-only tools need without building anything);
#: ``_class_name`` names the denoiser class where it is not a UNet, as in a diffusers config.json.
BUILTIN_DENOISER_CONFIGS = {
    "builtin:tiny": TINY_UNET, "builtin:sd15-shape": SD15_UNET, "builtin:tiny-xl": TINY_XL_UNET,
    "builtin:sdxl-shape": SDXL_UNET, "builtin:tiny-xl-refiner": TINY_XL_REFINER_UNET,
    "builtin:sdxl-refiner-shape": SDXL_REFINER_UNET,
    "builtin:tiny-pixart": {"_class_name": "PixArtTransformer2DModel", **TINY_PIXART_TRANSFORMER},
    "builtin:pixart-sigma-shape": {"_class_name": "PixArtTransformer2DModel", **PIXART_SIGMA_TRANSFORMER},
    "builtin:tiny-sd3": {"_class_name": "SD3Transformer2DModel", **TINY_SD3_TRANSFORMER},
    "builtin:sd3-medium-shape": {"_class_name": "SD3Transformer2DModel", **SD3_MEDIUM_TRANSFORMER},
    "builtin:tiny-flux": {"_class_name": "FluxTransformer2DModel", **TINY_FLUX_TRANSFORMER},
    "builtin:flux-dev-shape": {"_class_name": "FluxTransformer2DModel", **FLUX_DEV_TRANSFORMER},
    "builtin:tiny-flux-fill": {"_class_name": "FluxTransformer2DModel", **TINY_FLUX_FILL_TRANSFORMER},
    "builtin:flux-fill-shape": {"_class_name": "FluxTransformer2DModel", **FLUX_FILL_DEV_TRANSFORMER},
    "builtin:tiny-flux-control": {"_class_name": "FluxTransformer2DModel", **TINY_FLUX_CONTROL_TRANSFORMER},
    "builtin:tiny-flux-kontext": {"_class_name": "FluxTransformer2DModel", **TINY_FLUX_TRANSFORMER},
    "builtin:flux-kontext-shape": {"_class_name": "FluxTransformer2DModel", **FLUX_DEV_TRANSFORMER},
    "builtin:tiny-flux-controlnet": {"_class_name": "FluxTransformer2DModel", **TINY_FLUX_TRANSFORMER},
}
XL_BUILTINS = ("builtin:tiny-xl", "builtin:sdxl-shape")
XL_REFINER_BUILTINS = ("builtin:tiny-xl-refiner", "builtin:sdxl-refiner-shape")
PIXART_BUILTINS = ("builtin:tiny-pixart", "builtin:pixart-sigma-shape")
SD3_BUILTINS = ("builtin:tiny-sd3", "builtin:sd3-medium-shape")
FLUX_BUILTINS = ("builtin:tiny-flux", "builtin:flux-dev-shape")
FLUX_FILL_BUILTINS = ("builtin:tiny-flux-fill", "builtin:flux-fill-shape")
FLUX_CONTROL_BUILTINS = ("builtin:tiny-flux-control",)
FLUX_KONTEXT_BUILTINS = ("builtin:tiny-flux-kontext", "builtin:flux-kontext-shape")
FLUX_CONTROLNET_BUILTINS = ("builtin:tiny-flux-controlnet",)


def _seeded(seed: int, build):
    """Build a module with weights drawn from a fixed seed, without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_builtin(name: str, device: str | torch.device | None = None):
    """Return the pipeline of a seeded built-in (``StableDiffusionPipeline``; ``StableDiffusionXLPipeline`` for
    :data:`XL_BUILTINS`, ``StableDiffusionXLImg2ImgPipeline`` for :data:`XL_REFINER_BUILTINS`,
    ``PixArtSigmaPipeline`` for :data:`PIXART_BUILTINS`, ``StableDiffusion3Pipeline`` for :data:`SD3_BUILTINS`,
    ``FluxPipeline`` for :data:`FLUX_BUILTINS`, ``FluxFillPipeline`` for :data:`FLUX_FILL_BUILTINS`,
    ``FluxControlPipeline`` for :data:`FLUX_CONTROL_BUILTINS`, ``FluxKontextPipeline`` for
    :data:`FLUX_KONTEXT_BUILTINS`, ``FluxControlNetPipeline`` for :data:`FLUX_CONTROLNET_BUILTINS`), eval mode. ``device="meta"`` builds it without weights (shapes only)."""
    if name in XL_BUILTINS:
        return _build_xl_builtin(name, device)
    if name in XL_REFINER_BUILTINS:
        return _build_xl_refiner_builtin(name, device)
    if name in PIXART_BUILTINS:
        return _build_pixart_builtin(name, device)
    if name in SD3_BUILTINS:
        return _build_sd3_builtin(name, device)
    if name in (*FLUX_BUILTINS, *FLUX_FILL_BUILTINS, *FLUX_CONTROL_BUILTINS, *FLUX_KONTEXT_BUILTINS):
        return _build_flux_builtin(name, device)
    if name in FLUX_CONTROLNET_BUILTINS:
        return _build_flux_controlnet_builtin(device)
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name == "builtin:tiny":
        unet_cfg, text_cfg, vae_cfg = TINY_UNET, TINY_TEXT, TINY_VAE
    elif name == "builtin:sd15-shape":
        unet_cfg, text_cfg, vae_cfg = SD15_UNET, SD15_TEXT, SD15_VAE
    else:
        raise SlimDiffError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTINS)}")
    with _build_device(device):
        unet = _seeded(0, lambda: UNet2DConditionModel(**unet_cfg))
        text_encoder = _seeded(1, lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)))
        vae = _seeded(2, lambda: AutoencoderKL(**vae_cfg))
    scheduler = PNDMScheduler.from_config(SD_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=builtin_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, text_encoder, vae):
        m.eval().requires_grad_(False)
    return pipe


def _build_device(device):
    """Construct on ``device`` (``meta``: no memory); ``None`` keeps torch's default."""
    return torch.device(device) if device is not None else nullcontext()


def _build_xl_builtin(name: str, device):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name == "builtin:tiny-xl":
        unet_cfg, text_cfg, text2_cfg, vae_cfg = TINY_XL_UNET, TINY_XL_TEXT, TINY_XL_TEXT_2, TINY_VAE
    else:
        unet_cfg, text_cfg, text2_cfg, vae_cfg = SDXL_UNET, SDXL_TEXT, SDXL_TEXT_2, SDXL_VAE
    with _build_device(device):
        unet = _seeded(0, lambda: UNet2DConditionModel(**unet_cfg))
        text_encoder = _seeded(1, lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)))
        text_encoder_2 = _seeded(3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text2_cfg)))
        vae = _seeded(2, lambda: AutoencoderKL(**vae_cfg))
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    tokenizer = builtin_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, text_encoder, text_encoder_2, vae):
        m.eval().requires_grad_(False)
    return pipe


def _build_xl_refiner_builtin(name: str, device):
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if name == "builtin:tiny-xl-refiner":
        unet_cfg, text2_cfg, vae_cfg = TINY_XL_REFINER_UNET, TINY_XL_TEXT_2, TINY_VAE
    else:
        unet_cfg, text2_cfg, vae_cfg = SDXL_REFINER_UNET, SDXL_TEXT_2, SDXL_VAE
    with _build_device(device):
        unet = _seeded(4, lambda: UNet2DConditionModel(**unet_cfg))
        text_encoder_2 = _seeded(3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text2_cfg)))
        vae = _seeded(2, lambda: AutoencoderKL(**vae_cfg))
    # as the published refiner's model_index: no first text tower, aesthetic-score time ids, and an empty negative
    # prompt encoded (not zeros)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=builtin_tokenizer(),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, text_encoder_2, vae):
        m.eval().requires_grad_(False)
    return pipe


def _build_pixart_builtin(name: str, device):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    if name == "builtin:tiny-pixart":
        transformer_cfg, text_cfg, vae_cfg = TINY_PIXART_TRANSFORMER, TINY_PIXART_TEXT, TINY_VAE
    else:
        transformer_cfg, text_cfg, vae_cfg = PIXART_SIGMA_TRANSFORMER, PIXART_SIGMA_TEXT, PIXART_SIGMA_VAE
    with _build_device(device):
        transformer = _seeded(0, lambda: PixArtTransformer2DModel(**transformer_cfg))
        text_encoder = _seeded(1, lambda: T5EncoderModel(T5Config(**text_cfg)))
        vae = _seeded(2, lambda: AutoencoderKL(**vae_cfg))
    scheduler = DPMSolverMultistepScheduler.from_config(PIXART_SCHEDULER)
    # PixArt's pipeline reads only input_ids and attention_mask from its tokenizer: the character-level one
    # serves the random T5 as well as it serves the random CLIP towers.
    pipe = PixArtSigmaPipeline(tokenizer=builtin_tokenizer(), text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    for m in (transformer, text_encoder, vae):
        m.eval().requires_grad_(False)
    return pipe


def _build_sd3_builtin(name: str, device):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if name == "builtin:tiny-sd3":
        configs = TINY_SD3_TRANSFORMER, TINY_SD3_TEXT, TINY_SD3_TEXT_2, TINY_SD3_TEXT_3, TINY_SD3_VAE
    else:
        configs = SD3_MEDIUM_TRANSFORMER, SD3_TEXT, SD3_TEXT_2, SD3_TEXT_3, SD3_VAE
    transformer_cfg, text_cfg, text2_cfg, text3_cfg, vae_cfg = configs
    with _build_device(device):
        transformer = _seeded(0, lambda: SD3Transformer2DModel(**transformer_cfg))
        text_encoder = _seeded(1, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)))
        text_encoder_2 = _seeded(3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text2_cfg)))
        text_encoder_3 = _seeded(4, lambda: T5EncoderModel(T5Config(**text3_cfg)))
        vae = _seeded(2, lambda: AutoencoderKL(**vae_cfg))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)
    # The pipeline reads only input_ids from its three tokenizers (the T5's padded to max_sequence_length): the
    # character-level one serves the random towers, as in the other built-ins.
    tokenizer = builtin_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    for m in (transformer, text_encoder, text_encoder_2, text_encoder_3, vae):
        m.eval().requires_grad_(False)
    return pipe


def _build_flux_builtin(name: str, device):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlPipeline, FluxFillPipeline,
                           FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tiny = name.startswith("builtin:tiny-")
    configs = (TINY_FLUX_TEXT, TINY_FLUX_TEXT_2, TINY_FLUX_VAE) if tiny else (FLUX_TEXT, FLUX_TEXT_2, FLUX_VAE)
    text_cfg, text2_cfg, vae_cfg = configs
    transformer_cfg, seed, cls = {
        "builtin:tiny-flux": (TINY_FLUX_TRANSFORMER, 0, FluxPipeline),
        "builtin:flux-dev-shape": (FLUX_DEV_TRANSFORMER, 0, FluxPipeline),
        "builtin:tiny-flux-fill": (TINY_FLUX_FILL_TRANSFORMER, 5, FluxFillPipeline),
        "builtin:flux-fill-shape": (FLUX_FILL_DEV_TRANSFORMER, 5, FluxFillPipeline),
        "builtin:tiny-flux-control": (TINY_FLUX_CONTROL_TRANSFORMER, 6, FluxControlPipeline),
        "builtin:tiny-flux-kontext": (TINY_FLUX_TRANSFORMER, 7, FluxKontextPipeline),
        "builtin:flux-kontext-shape": (FLUX_DEV_TRANSFORMER, 7, FluxKontextPipeline),
    }[name]
    with _build_device(device):
        # each kind of transformer draws from its own seed: different models, not one model in several pipelines
        transformer = _seeded(seed, lambda: FluxTransformer2DModel(**transformer_cfg))
        text_encoder = _seeded(1, lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)))
        text_encoder_2 = _seeded(3, lambda: T5EncoderModel(T5Config(**text2_cfg)))
        vae = _seeded(2, lambda: AutoencoderKL(**vae_cfg))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    # The pipeline reads only input_ids from its tokenizers (the T5's padded to max_sequence_length): the
    # character-level one serves the random towers, as in the other built-ins.
    tokenizer = builtin_tokenizer()
    pipe = cls(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    for m in (transformer, text_encoder, text_encoder_2, vae):
        m.eval().requires_grad_(False)
    return pipe


def _build_flux_controlnet_builtin(device):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    pipe = _build_flux_builtin("builtin:tiny-flux", device)
    config = pipe.transformer.config

    def controlnet():
        net = FluxControlNetModel.from_transformer(pipe.transformer, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=config.attention_head_dim,
                                                   num_attention_heads=config.num_attention_heads)
        # diffusers zero-initialises the projections a ControlNet is trained from: drawn here, so its samples count
        for linear in (net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks):
            torch.nn.init.normal_(linear.weight, std=0.2)
        return net

    with _build_device(device):
        net = _seeded(8, controlnet)
    net.eval().requires_grad_(False)
    pipe = FluxControlNetPipeline(controlnet=net, **pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def load_pipeline(source: str, dtype: torch.dtype = torch.float32, config: str | None = None,
                  variant: str | None = None, loras: Sequence[LoraSpec] = ()):
    """Load a text-to-image pipeline from a built-in name, a local diffusers folder or a ``.safetensors`` file.

    ``config``: for an original-layout ``.safetensors`` checkpoint, a diffusers folder holding its configuration
    (default: the shipped configuration that matches the checkpoint, :mod:`slimdiff.single_file`).
    ``variant``: the weight variant of a pipeline folder (``fp16``); default: the plain files, or the only
    variant present when there are none (:mod:`slimdiff.sources`).
    ``loras``: LoRAs fused into the weights, in order (:func:`slimdiff.lora.fuse_loras`); their files are checked
    before the model loads.

    A slim denoiser folder loads the pipeline it was slimmed from (recorded in its plan, with the LoRAs fused into
    it then) with the slim denoiser in it (``pipe.unet``, or ``pipe.transformer`` for the DiTs).
    """
    from .lora import check_loras, fuse_loras

    check_loras(loras)
    pipe = _load_pipeline(resolve_model_source(source), dtype,
                          None if config is None else resolve_model_source(config), variant)
    fuse_loras(pipe, loras)
    return pipe


def dense_source(slim_folder: str) -> dict:
    """The model a slim denoiser folder was slimmed from, as :func:`load_pipeline`'s arguments (``source``,
    ``config``, ``variant`` and the ``loras`` fused into it then), from the folder's plan."""
    from .lora import records_to_specs
    from .serialization import load_plan

    info = load_plan(slim_folder).info
    if not info.get("source_model"):
        raise SlimDiffError(f"slim folder {slim_folder!r} does not record the model it came from")
    return {"source": info["source_model"], "config": info.get("source_config"),
            "variant": info.get("source_variant"),
            "loras": records_to_specs(info.get("source_loras", []), f"slim folder {slim_folder!r}")}


def _load_pipeline(source: str, dtype: torch.dtype, config: str | None, variant: str | None):
    from .serialization import is_slim_folder, load_slim

    if not source.startswith("builtin:") and is_slim_folder(source):
        pipe = load_pipeline(dtype=dtype, **dense_source(source))
        setattr(pipe, family_for(pipe).component, load_slim(source, dtype=dtype))
        return pipe
    if source == "builtin:proxy":
        folder = ASSETS / "proxy"
        if not (folder / "model_index.json").is_file():
            raise SlimDiffError("the proxy model's weights are not in this checkout "
                                "(train them with `python -m slimdiff.proxy.train`)")
        return load_pipeline(str(folder), dtype)
    if source in BUILTINS:
        pipe = build_builtin(source)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    if source.startswith("builtin:"):
        raise SlimDiffError(f"unknown built-in model {source!r}; choose one of {', '.join(BUILTINS)}")
    path = Path(source)
    if not path.exists():
        raise SlimDiffError(missing_message(source))
    try:
        with _quiet_loading():
            pipe = _load_local_pipeline(path, source, dtype, config, variant)
    except SlimDiffError:
        raise
    except Exception as exc:  # diffusers raises many types; the user needs one line
        raise SlimDiffError(f"could not load a diffusion pipeline from {source!r}: {exc}{_damaged_file_note(exc)}") \
            from exc
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return pipe


@contextmanager
def _quiet_loading():
    """Loading bars and API-deprecation chatter would bury the one line a user needs on failure."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _load_local_pipeline(path: Path, source: str, dtype: torch.dtype, config: str | None = None,
                         variant: str | None = None):
    if path.is_file():
        from .single_file import load_single_file, unsupported_file_message

        if path.suffix != ".safetensors":
            raise SlimDiffError(unsupported_file_message(source))
        return load_single_file(path, dtype, config)
    if (path / "model_index.json").exists():
        from diffusers import (StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                               StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                               StableDiffusionXLPipeline)

        from .sources import choose_variant, refuse_pickled_components

        pipeline_cls = _pipeline_class(path, source)  # first: one line for an incomplete folder
        chosen = choose_variant(path, variant)
        refuse_pickled_components(path)
        options = {}
        if pipeline_cls.__name__ == SD3_PIPELINE and not _has_component(path, "text_encoder_3"):
            # SD3 without its T5 (the documented way to save memory): the pipeline conditions on zeros in its place
            options = dict(text_encoder_3=None, tokenizer_3=None)
        elif pipeline_cls in (StableDiffusionPipeline, StableDiffusionInpaintPipeline):
            # The safety checker and its feature extractor play no part in slimming: not loaded, even when present.
            options = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif pipeline_cls in (StableDiffusionXLPipeline, StableDiffusionXLInpaintPipeline,
                              StableDiffusionXLImg2ImgPipeline):
            options = dict(add_watermarker=False)
        return pipeline_cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True,
                                            use_safetensors=True, variant=chosen, **options)
    _refuse_export_output(path, source)
    _refuse_component_folder(path, source)
    # A checkpoint kept in a folder (a Hub snapshot of a single-file repository, a download folder): name the file
    checkpoints = sorted(p.name for p in path.glob("*.safetensors"))
    if checkpoints:
        raise SlimDiffError(f"{source!r} is no diffusers pipeline folder (no model_index.json) but holds "
                            f"{', '.join(checkpoints)}: pass the checkpoint file itself")
    raise SlimDiffError(
        f"{source!r} is not a diffusers pipeline folder (no model_index.json); "
        "pass a pipeline folder, a .safetensors checkpoint or a built-in name"
    )


def _refuse_component_folder(path: Path, source: str) -> None:
    """One line for a component of a pipeline folder given as the model (``sdxl/unet``, ``flux/transformer``): what it
    holds, and the pipeline folder above it, which slimdiff samples with."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    cls_name = config.get("_class_name") if isinstance(config, dict) else None
    if not cls_name:
        return
    above = path.resolve().parent
    where = (f"pass the pipeline folder it belongs to ({str(above)!r})" if (above / "model_index.json").is_file()
             else "pass the pipeline folder it belongs to (the folder with model_index.json)")
    raise SlimDiffError(f"{source!r} is one component of a pipeline ({cls_name}, config.json), not a pipeline: "
                        f"slimdiff samples with the whole pipeline; {where}")


def _refuse_export_output(path: Path, source: str) -> None:
    """One line naming what ``slimdiff-export`` wrote, given where a source model goes: its output folder (with
    the models it came from) or one of its engine folders."""
    from .engines.base import engine_components, engine_meta_path
    from .export.meta import EXPORT_FILE

    try:
        export = json.loads((path / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no export, or one too damaged to name its models: not a source model either way
        export = None
    if isinstance(export, dict):
        dense, slim = export.get("dense_model"), export.get("slim_model")
        models = [f"the model it was exported from ({dense})" if dense else "the model it was exported from",
                  *([f"its slim folder ({path / slim})"] if slim else [])]
        raise SlimDiffError(f"{source!r} is the output of slimdiff-export ({EXPORT_FILE}), not a source model: pass "
                            f"{' or '.join(models)}; `slimdiff bench --model {source}` times its models and engines "
                            "as they are")
    components = engine_components(path)
    if components:
        raise SlimDiffError(f"{source!r} is an engine folder ({engine_meta_path(path, components[0]).name}, written by "
                            "slimdiff-export), not a source model: run it in a pipeline with "
                            "slimdiff.runtime.use_engine(pipe, folder)")


PIXART_PIPELINES = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
SD3_PIPELINE = "StableDiffusion3Pipeline"
FLUX_PIPELINE = "FluxPipeline"
FLUX_FILL_PIPELINE = "FluxFillPipeline"
FLUX_CONTROL_PIPELINE = "FluxControlPipeline"
FLUX_KONTEXT_PIPELINE = "FluxKontextPipeline"
FLUX_CONTROLNET_PIPELINE = "FluxControlNetPipeline"
#: Pipelines that load as themselves: their transformers are called with inputs of their own (a FLUX ControlNet
#: pipeline's with its ControlNet's samples).
FLUX_OWN_PIPELINES = (FLUX_FILL_PIPELINE, FLUX_CONTROL_PIPELINE, FLUX_KONTEXT_PIPELINE, FLUX_CONTROLNET_PIPELINE)
#: Folders of these classes hold the same components and load as the text-to-image pipeline, except FLUX Fill's,
#: FLUX Control's, FLUX Kontext's and the FLUX ControlNet one (:data:`FLUX_OWN_PIPELINES`), which load as themselves (other FLUX pipelines —
#: the Control image-to-image and inpainting ones — feed their transformers inputs no family samples).
FLUX_PIPELINES = (FLUX_PIPELINE, "FluxImg2ImgPipeline", *FLUX_OWN_PIPELINES)
#: Folders of these classes hold the same components and load as the text-to-image pipeline.
SD3_PIPELINES = (SD3_PIPELINE, "StableDiffusion3Img2ImgPipeline")


def _model_index(path: Path, source: str) -> dict:
    try:
        return json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as exc:
        raise SlimDiffError(f"{source!r}: model_index.json is not valid JSON ({exc})") from exc


def _component_config(path: Path, component: str = "unet") -> dict:
    """The folder's ``<component>/config.json``; empty when missing or broken (diffusers' own loader reports it)."""
    try:
        return json.loads((path / component / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _check_flux_input(config: dict, source: str, cls_name: str, kind: str) -> None:
    """One line for a FLUX folder whose transformer (of ``config``) takes other tokens than its pipeline ``kind``
    (the folder's ``cls_name`` loaded as) makes: a Fill pipeline's carry the latent, the masked image's latent and the mask; a Control pipeline's the latent
    and the control image's latent; a text-to-image pipeline's and a Kontext pipeline's the latent alone (Kontext's
    reference image adds tokens, not features)."""
    from .families.flux import input_features, is_text_to_image_transformer
    from .families.flux_control import is_control_transformer
    from .families.flux_fill import is_fill_transformer

    if not config:
        return
    kinds = {FLUX_FILL_PIPELINE: ("a FLUX Fill transformer", is_fill_transformer),
             FLUX_CONTROL_PIPELINE: ("a FLUX Control transformer", is_control_transformer),
             FLUX_PIPELINE: ("a text-to-image transformer", is_text_to_image_transformer),
             FLUX_KONTEXT_PIPELINE: ("a text-to-image transformer", is_text_to_image_transformer),
             FLUX_CONTROLNET_PIPELINE: ("a text-to-image transformer", is_text_to_image_transformer)}
    if kinds[kind][1](config):
        return
    found = next((what for what, fits in kinds.values() if fits(config)), "a transformer of unknown input")
    features = input_features(config)
    raise SlimDiffError(f"{source!r} is a {cls_name} folder whose transformer takes {features} features per token: "
                        f"{found}, not {kinds[kind][0]}; the folder mixes two models")


def _check_unet_input(config: dict, source: str, cls_name: str) -> bool:
    """Whether the folder's UNet (of ``config``) is an inpainting one (the latent, the mask and the masked image's
    latent: 9 input channels; loaded with the inpainting pipeline class). Other UNets taking image conditioning
    beside the latent (InstructPix2Pix: 8, SD-2 depth: 5) are refused: their pipelines' inputs are not calibrated
    yet, and a text-to-image call would fail on the first UNet call."""
    from .families.inpaint import is_inpainting_unet

    unet_in, latent = config.get("in_channels", 4), config.get("out_channels", 4)
    if unet_in == latent:
        return False
    if is_inpainting_unet(config):
        return True
    raise SlimDiffError(f"{source!r} is a {cls_name or 'pipeline'} folder whose UNet takes {unet_in} input channels "
                        f"({latent} latent + {unet_in - latent} of image conditioning: an InstructPix2Pix or depth "
                        "model); slimdiff calibrates text-to-image and inpainting UNets only so far")


def _check_time_ids(config: dict, source: str, refiner: bool) -> None:
    """One line for an SDXL folder whose UNet (of ``config``) takes the other model's time ids (the pipeline would
    fail on its first UNet call): a refiner's pipeline makes five (with the aesthetic score), a base's six."""
    from .families.sdxl import is_refiner_unet

    if config.get("addition_embed_type") == "text_time" and is_refiner_unet(config) != refiner:
        folder, unet = ("an SDXL refiner", "a base") if refiner else ("an SDXL base", "a refiner")
        raise SlimDiffError(f"{source!r} is {folder} folder (by its model_index.json) holding {unet} UNet (by its "
                            "time ids): the folder mixes the two models")


def _has_component(path: Path, component: str, index: dict | None = None) -> bool:
    """Whether a pipeline folder's index lists ``component`` and the folder holds it."""
    entry = (index if index is not None else _model_index(path, str(path))).get(component)
    return isinstance(entry, list) and entry[0] is not None and (path / component).is_dir()


def _pipeline_class(path: Path, source: str):
    """The diffusers pipeline class that loads the folder: ``StableDiffusionXLPipeline`` for an SDXL base folder
    (text-to-image or img2img class: both load as the text-to-image pipeline), ``StableDiffusionXLImg2ImgPipeline``
    for the SDXL refiner (no first text tower, aesthetic-score time ids), the folder's own class for PixArt,
    ``StableDiffusion3Pipeline`` for SD3 (text-to-image or img2img), ``FluxPipeline`` for FLUX (text-to-image or
    img2img), ``FluxFillPipeline`` for FLUX Fill, ``FluxControlPipeline`` for FLUX Control, ``FluxKontextPipeline``
    for FLUX Kontext,
    ``StableDiffusionPipeline`` otherwise; one line
    for folders slimdiff cannot calibrate."""
    import diffusers

    index = _model_index(path, source)
    cls_name = str(index.get("_class_name", ""))

    def present(component: str) -> bool:
        return _has_component(path, component, index)

    def require(components: Sequence[str], why: str | None, what: str = f"a {cls_name or 'pipeline'} folder",
                also_missing: Sequence[str] = ()) -> None:
        """One line naming every one of ``components`` the folder lacks (diffusers would name only the first file
        it missed), and ``also_missing``."""
        missing = [c for c in components if not present(c)] + list(also_missing)
        if missing:
            raise SlimDiffError(f"{source!r} is {what} without {', '.join(missing)}{f' ({why})' if why else ''}: "
                                "the folder is incomplete")

    # every family samples through its VAE and scheduler
    require(("vae", "scheduler"), "calibration samples images through the pipeline")
    if cls_name in PIXART_PIPELINES:
        # diffusers lists PixArt's tokenizer and text encoder as optional (prompt embeddings can be passed in),
        # but calibration runs the pipeline on prompts.
        require(("transformer", "text_encoder", "tokenizer"),
                "calibration needs the transformer, the T5 text encoder and its tokenizer")
        return getattr(diffusers, cls_name)
    if cls_name.startswith("Flux") and cls_name not in FLUX_PIPELINES:
        raise SlimDiffError(f"{source!r} is a {cls_name} folder; slimdiff calibrates FLUX through its text-to-image, "
                            f"Fill, Control, Kontext and ControlNet pipelines: pass a {' or '.join(FLUX_PIPELINES)} "
                            "folder")
    if cls_name in FLUX_PIPELINES:
        # calibration runs the pipeline on prompts: the transformer and both text towers are needed
        require(("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                 *(("controlnet",) if cls_name == FLUX_CONTROLNET_PIPELINE else ())),
                "calibration needs the transformer, the CLIP and T5 text encoders and their tokenizers, and a "
                "ControlNet pipeline its ControlNet")
        kind = cls_name if cls_name in FLUX_OWN_PIPELINES else FLUX_PIPELINE
        _check_flux_input(_component_config(path, "transformer"), source, cls_name, kind)
        return getattr(diffusers, kind)
    if cls_name.startswith("StableDiffusion3") and cls_name not in SD3_PIPELINES:
        raise SlimDiffError(f"{source!r} is a {cls_name} folder; slimdiff calibrates SD3 through its text-to-image "
                            f"pipeline: pass a {' or '.join(SD3_PIPELINES)} folder")
    if cls_name in SD3_PIPELINES:
        # Calibration runs the pipeline on prompts: the transformer and both CLIP towers are needed. The T5 tower
        # may be left out (the pipeline then conditions on zeros in its place), but not half of it.
        half_t5 = [] if present("text_encoder_3") == present("tokenizer_3") else [
            "tokenizer_3" if present("text_encoder_3") else "text_encoder_3"]
        require(("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                "calibration needs the transformer and both CLIP text encoders with their tokenizers; the T5 encoder "
                "may be left out, with its tokenizer", also_missing=half_t5)
        return diffusers.StableDiffusion3Pipeline
    require(("unet",), None)
    unet_config = _component_config(path)
    inpainting = _check_unet_input(unet_config, source, cls_name)
    if not cls_name.startswith("StableDiffusionXL"):
        require(("text_encoder", "tokenizer"), "calibration runs the pipeline on prompts")
        return diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    if index.get("requires_aesthetics_score") or not present("text_encoder"):
        # the refiner: the second text tower only, aesthetic-score time ids; an image-to-image pipeline
        require(("text_encoder_2", "tokenizer_2"), "calibration runs the refiner on prompts and images",
                what="an SDXL refiner folder")
        if inpainting:
            raise SlimDiffError(f"{source!r} is an SDXL refiner folder with an inpainting UNet; slimdiff knows the "
                                "refiner as an image-to-image model only")
        _check_time_ids(unet_config, source, refiner=True)
        return diffusers.StableDiffusionXLImg2ImgPipeline
    _check_time_ids(unet_config, source, refiner=False)
    require(("tokenizer", "text_encoder_2", "tokenizer_2"), "both text encoders are needed, with their tokenizers",
            what="an SDXL pipeline")
    return diffusers.StableDiffusionXLInpaintPipeline if inpainting else diffusers.StableDiffusionXLPipeline


def _damaged_file_note(exc: BaseException) -> str:
    """What safetensors found wrong with a file, where diffusers' error hides it behind its causes (a truncated
    copy or download: 'Unable to load weights from checkpoint file …' alone does not say why)."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if type(cause).__name__ == "SafetensorError":
            return f" — the file is damaged or cut short ({cause}): copy or download it again"
        cause = cause.__cause__ or cause.__context__
    return ""


def load_unet(source: str, dtype: torch.dtype = torch.float32):
    """Load only a UNet: a built-in, a pipeline folder, a UNet folder or a ``.safetensors`` checkpoint."""
    from diffusers import UNet2DConditionModel

    source = resolve_model_source(source)
    path = Path(source)
    if not source.startswith("builtin:") and path.is_dir() and not (path / "model_index.json").exists():
        config = path / "config.json"
        if not config.exists():
            raise SlimDiffError(f"{source!r} has neither model_index.json nor config.json")
        try:
            cls_name = json.loads(config.read_text()).get("_class_name")
        except json.JSONDecodeError as exc:
            raise SlimDiffError(f"{config}: not valid JSON ({exc})") from exc
        if cls_name != "UNet2DConditionModel":
            raise SlimDiffError(f"{source!r} holds a {cls_name}, not a UNet2DConditionModel")
        unet = UNet2DConditionModel.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
        return unet.eval().requires_grad_(False)
    return load_pipeline(source, dtype).unet
