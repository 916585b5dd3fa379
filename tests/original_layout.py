"""Test helper: a diffusers SD pipeline's weights in the original (CompVis / Stability) single-file key layout.

The inverse of diffusers' ``convert_ldm_*`` loaders, written from the layout itself, so that tests can build
small checkpoints laid out like ``v1-5-pruned-emaonly.safetensors`` (SD-1.x: CLIP text encoder),
``v2-1_768-ema-pruned.safetensors`` (SD-2.x: OpenCLIP text encoder), ``sd_xl_base_1.0.safetensors`` (both) or
``sd_xl_refiner_1.0.safetensors`` (OpenCLIP alone) and check that loading them gives back exactly the weights they
were made from.
"""

from __future__ import annotations

import re

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_key(key: str, config) -> str:
    """One diffusers UNet key → its ``model.diffusion_model.*`` key."""
    per_block = config["layers_per_block"] + 1
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_block * i + j + 1
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per_block * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_block * i + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        return f"output_blocks.{per_block * i + per_block - 1}.{slot}.conv.{m[2]}"
    raise KeyError(key)


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, config) -> str:
    """One diffusers VAE key → its ``first_stage_model.*`` key (without the prefix)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = key.replace("mid_block.attentions.0", "mid.attn_1")
    for new, old in _VAE_ATTENTION.items():
        key = key.replace(f"mid.attn_1.{new}.", f"mid.attn_1.{old}.")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    last = len(config["up_block_types"]) - 1
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{last - int(m[1])}.block", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{last - int(m[1])}.upsample", key)
    return key


def _open_clip(text_state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict in OpenCLIP's layout (fused q/k/v projections)."""
    out = {}
    top = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for raw, value in text_state.items():
        key = raw.removeprefix("text_model.")
        if key == "text_projection.weight":  # OpenCLIP multiplies by its projection from the right
            out[prefix + "text_projection"] = value.T
            continue
        if key in top:
            out[prefix + top[key]] = value
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", key)
        layer, module, kind = int(m[1]), m[2], m[3]
        block = f"{prefix}transformer.resblocks.{layer}."
        if module.startswith("self_attn.") and module.endswith(("q_proj", "k_proj", "v_proj")):
            if module.endswith("q_proj"):
                parts = [text_state[raw.replace("q_proj", f"{p}_proj")] for p in "qkv"]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts)
            continue
        out[f"{block}{names[module]}.{kind}"] = value
    return out


def to_original_layout(pipe, text_layout: str = "clip") -> dict[str, torch.Tensor]:
    """UNet, VAE and text encoder(s) of ``pipe`` under original keys; ``text_layout``: ``clip`` (SD-1.x),
    ``open_clip`` (SD-2.x), ``sdxl`` (CLIP and OpenCLIP under ``conditioner.embedders``) or ``sdxl_refiner``
    (``text_encoder_2`` alone, as OpenCLIP under ``conditioner.embedders.0``). VAE attention projections become
    1×1 convolutions, as in the original files."""
    state = {}
    for key, value in pipe.unet.state_dict().items():
        state["model.diffusion_model." + unet_key(key, pipe.unet.config)] = value
    for key, value in pipe.vae.state_dict().items():
        new = vae_key(key, pipe.vae.config)
        if ".mid.attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]
        state["first_stage_model." + new] = value
    if text_layout == "clip":
        state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                      for k, v in pipe.text_encoder.state_dict().items()})
    elif text_layout == "sdxl":
        state.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                      for k, v in pipe.text_encoder.state_dict().items()})
        state.update(_open_clip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    elif text_layout == "sdxl_refiner":  # the refiner's one tower, SDXL's second, is its first embedder
        state.update(_open_clip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.0.model."))
    else:
        state.update(_open_clip(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
