"""The architecture configurations the project ships, as diffusers / transformers config dictionaries.

Plain data, no model construction: :mod:`slimdiff.models` builds the seeded built-ins from them and
:mod:`slimdiff.single_file` writes them as the configuration folder of original-layout checkpoints.
Scheduler dictionaries are in ``scheduler_config.json`` form (``_class_name`` included).
"""

from __future__ import annotations

# CLIP's BPE vocabulary (openai/clip-vit-large-patch14, also OpenCLIP's) and its BOS/EOS ids.
CLIP_VOCAB_SIZE = 49408
CLIP_TOKEN_IDS = dict(bos_token_id=49406, eos_token_id=49407)

# BOS/EOS ids of the character tokenizer; CLIP's pooled output is read at the EOS position.
_CHAR_TOKEN_IDS = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, **_CHAR_TOKEN_IDS,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

# stabilityai/stable-diffusion-2-1 (768 px, v-prediction): the SD-2.x checkpoints most users have.
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True)
SD21_TEXT = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                 pad_token_id=1, **CLIP_TOKEN_IDS)
SD21_VAE = dict(SD15_VAE, sample_size=768)

# SD-1.x block structure at toy width: two cross-attention levels with 2 heads of width 16 and 32, GEGLU FFNs.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=2, norm_num_groups=8,
)
TINY_TEXT = dict(
    vocab_size=514, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64, **_CHAR_TOKEN_IDS,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    block_out_channels=(16, 32), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)

# SDXL-base 1.0 as published (unet/, text_encoder/, text_encoder_2/, vae/ config.json). diffusers' historical
# ``attention_head_dim`` holds the number of heads per level here: 5/10/20 heads of width 64.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, norm_num_groups=32,
    # micro-conditioning: pooled text (1280) + six size/crop numbers embedded at 256 each = 2816
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT = dict(  # CLIP ViT-L/14; SDXL reads its penultimate hidden state
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, **_CHAR_TOKEN_IDS,
)
SDXL_TEXT_2 = dict(  # OpenCLIP ViT-bigG/14 with its text projection (the pooled 1280-vector)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, **_CHAR_TOKEN_IDS,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# SDXL's structure at toy width: no attention at the first level, a deeper stack at the last, heads of
# width 16 everywhere (as SDXL's are all 64 wide), linear projections, text_time added conditioning.
TINY_XL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
    cross_attention_dim=64, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
)
# SDXL-refiner 1.0 as published (unet/config.json): conditioned on the second text tower only (1280 wide), with
# five micro-conditioning numbers — the base's minus the target size, plus an aesthetic score. Attention at the two
# middle of four levels (6/12/24/24 heads of width 64), four transformer blocks per stage and in the mid block.
SDXL_REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), use_linear_projection=True,
    cross_attention_dim=1280, norm_num_groups=32,
    # pooled text (1280) + five numbers (original size, crop top-left, aesthetic score) embedded at 256 each = 2560
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560,
)
# The refiner's structure at toy width over builtin:tiny-xl's second tower (32 wide): attention at the middle
# levels only, heads of width 16, two blocks per stage, five time ids.
TINY_XL_REFINER_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True,
    cross_attention_dim=32, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=72,
)
TINY_XL_TEXT = dict(TINY_TEXT, hidden_size=32, intermediate_size=64, projection_dim=32)
TINY_XL_TEXT_2 = dict(TINY_TEXT, hidden_size=32, intermediate_size=64, projection_dim=32, hidden_act="gelu")

# SD-1.x's scheduler_config.json (runwayml/stable-diffusion-v1-5); SD-2.1 v-prediction overrides prediction_type.
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True,
                "steps_offset": 1, "set_alpha_to_one": False}
# SDXL-base 1.0's scheduler_config.json (stabilityai/stable-diffusion-xl-base-1.0), the keys
# EulerDiscreteScheduler reads (the file also carries DDIM/PNDM keys it ignores).
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                  "timestep_spacing": "leading", "interpolation_type": "linear", "prediction_type": "epsilon",
                  "use_karras_sigmas": False}

# PixArt-Σ's structure at toy width (diffusers' PixArtTransformer2DModel, the config keys of PixArt-Σ's published
# transformer): adaLN-single blocks, 2 heads of width 16, a GELU(tanh) FFN, learned sigma (4 latent channels in,
# 8 out), no micro-conditioning. The caption projection maps the T5's width (24) to the inner width (32), so the
# text tokens a cross-attention reads differ from the ones the denoiser is called with.
TINY_PIXART_TRANSFORMER = dict(
    sample_size=16, num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
    patch_size=2, attention_bias=True, cross_attention_dim=32, caption_channels=24,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
)
# A T5 v1.1 encoder (gated-GELU FFN, as PixArt's T5-XXL) over the character tokenizer's 514 ids.
TINY_PIXART_TEXT = dict(
    vocab_size=514, d_model=24, d_kv=12, d_ff=48, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
    is_encoder_decoder=False, **_CHAR_TOKEN_IDS,
)
# PixArt-Σ-XL-2-1024-MS as published: the transformer config of PixArt's own converter (PixArt-alpha/PixArt-sigma,
# tools/convert_pixart_to_diffusers.py, image size 1024: sample_size 1024 // 8, interpolation_scale 2, no
# micro-conditioning, which only PixArt-α 1024 has), T5 v1.1 XXL's encoder (google-research t5.1.1.xxl: d_model
# 4096, d_ff 10240, 64 heads of 64, 24 layers, gated GELU, 32,128-token vocabulary) and the SDXL VAE
# (pixart_sigma_sdxlvae_T5_diffusers).
PIXART_SIGMA_TRANSFORMER = dict(
    sample_size=128, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
    patch_size=2, attention_bias=True, cross_attention_dim=1152, caption_channels=4096,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False,
)
PIXART_SIGMA_TEXT = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, is_encoder_decoder=False, **_CHAR_TOKEN_IDS,
)
PIXART_SIGMA_VAE = SDXL_VAE

# PixArt-Σ's pipelines are converted with ``DPMSolverMultistepScheduler()`` (PixArt-alpha/PixArt-sigma,
# tools/convert_pixart_to_diffusers.py): diffusers' defaults, written out where they shape the sampling.
PIXART_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.0001, "beta_end": 0.02,
                    "beta_schedule": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                    "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                    "lower_order_final": True, "timestep_spacing": "linspace", "steps_offset": 0}

# Stable Diffusion 3 medium as published (stabilityai/stable-diffusion-3-medium-diffusers): the transformer config
# that diffusers' converter (scripts/convert_sd3_to_diffusers.py) writes for the 2B checkpoint — 24 MMDiT blocks of
# 24 heads of 64 (caption_projection_dim 1536 = 24 · 64, the context embedder's output rows), T5-XXL's 4096-wide
# tokens in, the two CLIPs' pooled 768 + 1280 = 2048, 16 latent channels, patch 2, a 192² position table (36,864
# positions: what diffusers' single-file loader reads as "sd3" rather than SD3.5 medium's 384²), no q/k norm and no
# dual attention (SD3.5's additions). Text towers: CLIP ViT-L/14 and OpenCLIP bigG/14, both with their text
# projection, and T5 v1.1 XXL's encoder (PixArt-Σ's); the VAE: SDXL's layout with 16 latent channels, no quant
# convolutions, SD3's scaling and shift factors (the converter's overrides).
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None,
)
SD3_TEXT = SDXL_TEXT  # CLIP ViT-L/14 (as CLIPTextModelWithProjection: the 768-wide pooled projection)
SD3_TEXT_2 = SDXL_TEXT_2  # OpenCLIP ViT-bigG/14 with its 1280-wide projection
SD3_TEXT_3 = PIXART_SIGMA_TEXT  # T5 v1.1 XXL encoder
SD3_VAE = dict(SDXL_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
               shift_factor=0.0609)
# stable-diffusion-3-medium-diffusers' scheduler_config.json: flow matching with a shift of 3.
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

# SD3's structure at toy width: two MMDiT blocks (the last one context_pre_only, as diffusers builds every SD3
# transformer), 2 heads of 16 (so that attention ranks can drop below the head width at the allocator's alignment
# of 8), the tiny VAE with SD3's 16 latent channels (latent 16×16 for 32 px images). The text
# towers are tiny-xl's two CLIPs (32 wide, 32-wide projections: pooled 64) and a T5 v1.1 encoder 96 wide. SD3's
# pipeline zero-pads the side-by-side CLIP token states to the T5 width before it appends the T5 tokens, so
# joint_attention_dim (the T5 width) must exceed the CLIP widths' sum, as SD3's 4096 exceeds 768 + 1280: 96 > 64.
TINY_SD3_TRANSFORMER = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=24, dual_attention_layers=(), qk_norm=None,
)
TINY_SD3_TEXT = TINY_XL_TEXT
TINY_SD3_TEXT_2 = TINY_XL_TEXT_2
TINY_SD3_TEXT_3 = dict(TINY_PIXART_TEXT, d_model=96, d_kv=16, d_ff=128)
TINY_SD3_VAE = dict(TINY_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                    scaling_factor=SD3_VAE["scaling_factor"], shift_factor=SD3_VAE["shift_factor"])

# FLUX.1-dev as published (black-forest-labs/FLUX.1-dev, transformer/config.json): 19 double-stream (MMDiT) blocks and
# 38 single-stream blocks of 24 heads of 128 (inner width 3072), T5-XXL's 4096-wide tokens in, CLIP-L's pooled 768,
# packed latents (16 VAE channels × 2×2 patches = 64 in), rotary axes 16 + 56 + 56 = 128, and the guidance
# embedding of the guidance-distilled model (FLUX.1-schnell: the same without it). Text towers: CLIP ViT-L/14
# (CLIPTextModel: the pooled output) and T5 v1.1 XXL's encoder; the VAE: SD3's layout with FLUX's scaling and shift.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLUX_TEXT = SDXL_TEXT  # CLIP ViT-L/14's text model
FLUX_TEXT_2 = PIXART_SIGMA_TEXT  # T5 v1.1 XXL encoder
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
# FLUX.1-dev's scheduler_config.json: flow matching whose shift follows the image's token count (dynamic shifting).
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}

# FLUX's structure at toy width: 2 double-stream and 2 single-stream blocks of 2 heads of 16 (rotary axes 4 + 6 + 6),
# the guidance embedding (FLUX.1-dev's), builtin:tiny's CLIP (64 wide: pooled 64) and tiny-sd3's T5 (96 wide), the
# tiny VAE with 16 latent channels (latent 16×16 for 32 px images: 64 packed tokens of 64 channels).
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=96, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
TINY_FLUX_TEXT = TINY_TEXT
TINY_FLUX_TEXT_2 = TINY_SD3_TEXT_3
TINY_FLUX_VAE = dict(TINY_SD3_VAE, scaling_factor=FLUX_VAE["scaling_factor"], shift_factor=FLUX_VAE["shift_factor"])

# FLUX.1-Fill-dev as published (black-forest-labs/FLUX.1-Fill-dev, transformer/config.json): FLUX.1-dev's transformer
# whose tokens carry the noisy latent (64), the masked image's latent (64) and the mask — the 8×8 pixels under each
# latent pixel as channels, packed 2×2: 256 — side by side: 384 features in, the latent's 64 out. The tiny one: the
# tiny VAE's scale 2 makes the mask 2·2·4 = 16 of 144 features.
FLUX_FILL_DEV_TRANSFORMER = dict(FLUX_DEV_TRANSFORMER, in_channels=384, out_channels=64)
TINY_FLUX_FILL_TRANSFORMER = dict(TINY_FLUX_TRANSFORMER, in_channels=144, out_channels=64)
# FLUX.1-Depth-dev / FLUX.1-Canny-dev (black-forest-labs, transformer/config.json): FLUX.1-dev's transformer whose
# tokens carry the latent (64) and the control image's latent (64): 128 features in, 64 out.
TINY_FLUX_CONTROL_TRANSFORMER = dict(TINY_FLUX_TRANSFORMER, in_channels=128, out_channels=64)
