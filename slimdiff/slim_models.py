"""Slim denoisers as diffusers model classes: the rank plan lives in the model's config.

``SlimUNet2DConditionModel`` is a ``UNet2DConditionModel`` whose config carries ``rank_plan``; building it from
that config gives every compressible Linear the plan's width, so diffusers' own ``from_pretrained`` /
``save_pretrained`` / ``from_config`` work unchanged, and a pipeline folder whose ``model_index.json`` names
``["slimdiff.slim_models", "SlimUNet2DConditionModel"]`` loads with ``DiffusionPipeline.from_pretrained`` once
this module is imported (``from slimdiff import SlimUNet2DConditionModel`` does it): diffusers resolves a
component's library from the modules the program has imported, never by importing one a folder names.

The dense class must not read a slim folder as if it were dense. diffusers' loader does not compare a config's
``_class_name`` with the class loading it, and a dense skeleton would only fail later at the first resized
weight, with a shape mismatch that says nothing of slimdiff. The one config entry it checks before any weight is
``quantization_config``, so a slim folder's config carries :data:`DENSE_LOADER_STOP`: a ``quant_method`` that
names slimdiff, which ``UNet2DConditionModel.from_pretrained`` refuses with that name in its message. This class
removes the entry when it reads a config and writes it back when it saves one.
"""

from __future__ import annotations

import inspect
import json

import torch
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401  (diffusers finds the loader base here)
from diffusers.configuration_utils import register_to_config

from .errors import SlimDiffError
from .plan import RankPlan
from .rebuild import apply_plan_shapes

DENSE_LOADER_STOP = {"quant_method": "slimdiff: this folder holds a UNet slimmed by slimdiff; load it with "
                                     "slimdiff.SlimUNet2DConditionModel.from_pretrained"}


def _with_plan_parameter(init):
    """Give ``init`` the dense class's signature plus ``rank_plan``: diffusers reads a model's config keys off
    its ``__init__`` signature, both when saving a config and when building a model from one."""
    dense = inspect.signature(UNet2DConditionModel.__init__)
    plan = inspect.Parameter("rank_plan", inspect.Parameter.KEYWORD_ONLY, default=None)
    params = [p for p in dense.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    init.__signature__ = dense.replace(parameters=[*params, plan])
    return init


class SlimUNet2DConditionModel(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` slimmed by slimdiff: the dense architecture of its config with the Linear
    widths of ``config.rank_plan`` (a :class:`slimdiff.plan.RankPlan` as a dict; ``self.slim_plan`` holds it
    parsed). ``from_pretrained(folder)`` loads one; :meth:`from_slim` wraps a UNet slimmed in place."""

    @register_to_config
    @_with_plan_parameter
    def __init__(self, *args, rank_plan: dict | None = None, **kwargs):
        if rank_plan is None:
            raise SlimDiffError("SlimUNet2DConditionModel needs a rank_plan in its config")
        super().__init__(*args, **kwargs)
        self.slim_plan = RankPlan.from_dict(rank_plan)
        apply_plan_shapes(self, self.slim_plan)

    @classmethod
    def load_config(cls, *args, **kwargs):
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if config.get("quantization_config") == DENSE_LOADER_STOP:
            del config["quantization_config"]
        return loaded

    def to_json_string(self) -> str:
        config = json.loads(super().to_json_string())
        config["quantization_config"] = DENSE_LOADER_STOP
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_slim(cls, unet: UNet2DConditionModel, plan: RankPlan) -> "SlimUNet2DConditionModel":
        """The slim class holding ``unet``'s parameters (shared, not copied); ``unet`` must already have the
        plan's shapes (as :func:`slimdiff.slim.slim_unet` leaves it)."""
        config = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != "rank_plan"}
        with torch.device("meta"):
            slim = cls(**config, rank_plan=plan.to_dict())
        slim.load_state_dict(unet.state_dict(), strict=True, assign=True)
        return slim.eval().requires_grad_(False)
