"""Slim denoisers as diffusers model classes: the rank plan lives in the model's config.

One mechanism, :class:`SlimModelMixin`, serves every dense diffusers model class slimdiff slims; each slim class
is a declaration ``class SlimX(SlimModelMixin, X)`` — :class:`SlimUNet2DConditionModel` (SD-1.x/2.x, SDXL),
:class:`SlimPixArtTransformer2DModel` (PixArt-α/Σ), :class:`SlimSD3Transformer2DModel` (SD3) and
:class:`SlimFluxTransformer2DModel` (FLUX) — registered in
:data:`SLIM_CLASSES` by its name, which is the ``_class_name`` of the folders it writes. A slim class is its dense
class whose config carries ``rank_plan``; building it from that config gives every compressible Linear the plan's width, so diffusers' own
``from_pretrained`` / ``save_pretrained`` / ``from_config`` work unchanged, and a pipeline folder whose
``model_index.json`` names ``["slimdiff.slim_models", "SlimUNet2DConditionModel"]`` (or a DiT's slim class) loads
with ``DiffusionPipeline.from_pretrained`` once this module is imported (``from slimdiff import
SlimUNet2DConditionModel`` does it): diffusers resolves a component's library from the modules the program has
imported, never by importing one a folder names.

The dense class must not read a slim folder as if it were dense. diffusers' loader does not compare a config's
``_class_name`` with the class loading it, and a dense skeleton would only fail later at the first resized
weight, with a shape mismatch that says nothing of slimdiff. The one config entry it checks before any weight is
``quantization_config``, so a slim folder's config carries the slim class's ``dense_loader_stop``: a
``quant_method`` that names slimdiff and the slim class, which the dense class's ``from_pretrained`` refuses with
that text in its message. The slim class removes the entry when it reads a config and writes it back when it
saves one.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (FluxTransformer2DModel, ModelMixin, PixArtTransformer2DModel, SD3Transformer2DModel,
                       UNet2DConditionModel)
from diffusers.configuration_utils import register_to_config

from .errors import SlimDiffError
from .lora_maps import LinearMaps, read_maps, write_maps
from .plan import RankPlan
from .rebuild import apply_plan_shapes

#: Slim model classes by class name (the ``_class_name`` of the folders they write).
SLIM_CLASSES: dict[str, type] = {}
_STOP_PREFIX = "slimdiff: "


def _is_loader_stop(entry: Any) -> bool:
    """A ``quantization_config`` slimdiff wrote (any slim class, any slimdiff version)."""
    return isinstance(entry, dict) and str(entry.get("quant_method", "")).startswith(_STOP_PREFIX)


class SlimModelMixin:
    """What makes ``class SlimX(SlimModelMixin, X)`` the slimmed form of the dense diffusers model class ``X``:
    ``X``'s architecture with the Linear widths of ``config.rank_plan`` (a :class:`slimdiff.plan.RankPlan` as a
    dict; ``self.slim_plan`` holds it parsed). ``from_pretrained(folder)`` loads one; :meth:`from_slim` wraps a
    dense model slimmed in place."""

    dense_class: type  # X: the first ModelMixin base after this mixin
    dense_loader_stop: dict  # the quantization_config entry that stops X.from_pretrained on a slim folder
    slim_plan: RankPlan
    # how a LoRA of the dense model maps onto this one (``slimdiff slim --lora-maps``), saved beside the weights
    slim_lora_maps: LinearMaps | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.dense_class = next(base for base in cls.__mro__[1:]
                               if issubclass(base, ModelMixin) and not issubclass(base, SlimModelMixin))
        cls.dense_loader_stop = {"quant_method": f"{_STOP_PREFIX}this folder holds a {cls.dense_class.__name__} "
                                                 f"slimmed by slimdiff; load it with slimdiff.{cls.__name__}"
                                                 ".from_pretrained"}
        cls.__init__ = register_to_config(_slim_init(cls.dense_class))
        SLIM_CLASSES[cls.__name__] = cls

    @classmethod
    def load_config(cls, *args, **kwargs):
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if _is_loader_stop(config.get("quantization_config")):
            del config["quantization_config"]
        return loaded

    def to_json_string(self) -> str:
        config = json.loads(super().to_json_string())
        config["quantization_config"] = self.dense_loader_stop
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.slim_lora_maps is not None and kwargs.get("is_main_process", True):
            write_maps(self.slim_lora_maps, Path(save_directory), self.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.slim_lora_maps = read_maps(Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or ""))
        return model

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix: str | None = "transformer",
                          hotswap: bool = False, **kwargs):
        """Load a LoRA made for the dense model (``pipe.load_lora_weights`` lands here), mapped onto this model's
        resized Linears through the maps slimming kept (:mod:`slimdiff.lora_maps`); diffusers and peft then load,
        switch, weight, fuse and unload it as any LoRA. Without maps (slimmed without ``--lora-maps``) it is
        refused before peft touches the model: a LoRA for the dense model does not fit the resized Linears."""
        if self.slim_lora_maps is None:
            raise SlimDiffError(f"a LoRA made for the dense model does not fit this {type(self).__name__}: its "
                                "attention and FFN projections were resized, and it was slimmed without "
                                "--lora-maps (which keeps what maps a LoRA onto it). Slim with --lora-maps, or fuse "
                                "the LoRA before slimming: `slimdiff slim --lora FILE[:SCALE]` (with --stats of "
                                "the dense model, no new calibration)")
        from diffusers.utils import convert_unet_state_dict_to_peft
        from safetensors.torch import load_file

        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict):
            if not str(source).endswith(".safetensors") or not Path(source).is_file():
                raise SlimDiffError(f"give a slim model's LoRA as its tensors or a .safetensors file, not {source!r}")
            source = load_file(str(source))
        state = source if prefix is None else {k.removeprefix(f"{prefix}."): v for k, v in source.items()
                                               if k.startswith(f"{prefix}.")}
        if state and not any("lora_A" in k for k in state):
            state = convert_unet_state_dict_to_peft(state)
        mapped = self.map_dense_lora(state)
        if prefix is not None:
            mapped = {f"{prefix}.{k}": v for k, v in mapped.items()}
        return super().load_lora_adapter(mapped, prefix=prefix, hotswap=hotswap, **kwargs)

    def map_dense_lora(self, state: dict) -> dict:
        """A LoRA of the dense model in peft's layout (paths relative to this model) as a LoRA of this one
        (:meth:`slimdiff.lora_maps.LinearMaps.map_lora`); layers that already fit pass unchanged."""
        maps = self.slim_lora_maps
        return maps.map_lora(state, {p: tuple(self.get_submodule(p).weight.shape) for p in maps.paths})

    @classmethod
    def from_slim(cls, model: torch.nn.Module, plan: RankPlan):
        """The slim class holding ``model``'s parameters (shared, not copied); ``model``, of the dense class,
        must already have the plan's shapes (as :func:`slimdiff.slim.slim_unet` leaves it)."""
        config = {k: v for k, v in model.config.items() if not k.startswith("_") and k != "rank_plan"}
        with torch.device("meta"):
            slim = cls(**config, rank_plan=plan.to_dict())
        state = model.state_dict()
        slim.load_state_dict(state, strict=True, assign=True)
        slim.slim_lora_maps = getattr(model, "slim_lora_maps", None)
        # Non-persistent buffers (PixArt's position table) are not in a state dict: shared as well.
        for name, buffer in model.named_buffers():
            if name not in state:
                owner, _, leaf = name.rpartition(".")
                slim.get_submodule(owner).register_buffer(leaf, buffer, persistent=False)
        return slim.eval().requires_grad_(False)


def _slim_init(dense: type):
    """The ``__init__`` of a slim class of ``dense``: the dense architecture, then the plan's shapes. Its
    signature is the dense class's plus ``rank_plan``: diffusers reads a model's config keys off its ``__init__``
    signature, both when saving a config and when building a model from one."""

    def __init__(self, *args, rank_plan: dict | None = None, **kwargs):
        if rank_plan is None:
            raise SlimDiffError(f"{type(self).__name__} needs a rank_plan in its config")
        dense.__init__(self, *args, **kwargs)
        self.slim_plan = RankPlan.from_dict(rank_plan)
        apply_plan_shapes(self, self.slim_plan)

    signature = inspect.signature(dense.__init__)
    params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    plan = inspect.Parameter("rank_plan", inspect.Parameter.KEYWORD_ONLY, default=None)
    __init__.__signature__ = signature.replace(parameters=[*params, plan])
    return __init__


def slim_class_for(model: torch.nn.Module) -> type:
    """The slim class of a dense model (or of a slim one: its own class)."""
    if isinstance(model, SlimModelMixin):
        return type(model)
    for slim_cls in SLIM_CLASSES.values():
        if type(model) is slim_cls.dense_class:
            return slim_cls
    raise SlimDiffError(f"slimdiff has no slim model class for {type(model).__name__} "
                        f"(it has: {', '.join(c.dense_class.__name__ for c in SLIM_CLASSES.values())})")


class SlimUNet2DConditionModel(SlimModelMixin, UNet2DConditionModel):
    """A ``UNet2DConditionModel`` (SD-1.x/2.x, SDXL) slimmed by slimdiff (see :class:`SlimModelMixin`)."""


class SlimPixArtTransformer2DModel(SlimModelMixin, PixArtTransformer2DModel):
    """A ``PixArtTransformer2DModel`` (PixArt-α, PixArt-Σ) slimmed by slimdiff (see :class:`SlimModelMixin`)."""


class SlimSD3Transformer2DModel(SlimModelMixin, SD3Transformer2DModel):
    """An ``SD3Transformer2DModel`` (Stable Diffusion 3) slimmed by slimdiff (see :class:`SlimModelMixin`)."""


class SlimFluxTransformer2DModel(SlimModelMixin, FluxTransformer2DModel):
    """A ``FluxTransformer2DModel`` (FLUX.1-dev, FLUX.1-schnell) slimmed by slimdiff (see :class:`SlimModelMixin`)."""
