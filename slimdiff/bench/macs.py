"""Parameters and multiply–accumulates per UNet call, counted by ``torch.utils.flop_counter``.

What the counter sees (checked on torch 2.13 CPU, recorded in every report by :func:`counter_notes`):

* convolutions, ``mm``/``addmm`` (every Linear; a bias add is not a MAC) and ``bmm``/``baddbmm``;
* the CUDA SDPA kernels (flash, memory-efficient, cuDNN) through its own formula;
* **not** ``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel CPU SDPA dispatches to: the
  attention products QKᵀ and AV would count as zero on CPU. Worse, a slim attention whose q·k width differs from
  its v width falls back to the math path (``bmm``), which *is* counted — dense and slim would be counted
  differently. We register the counter's own SDPA formula for that op, so every path counts QKᵀ + AV.

Counting runs on the ``meta`` device from the UNet's config and the rank plan (no weights, < 1 s at SD-1.5
scale), so it is exact for shapes and independent of the engine that will run the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ..errors import SlimDiffError
from ..families import CROSS, FFN, family_for, module_sites
from ..plan import RankPlan

# Ops that compute attention products (as opposed to projections) when they run inside an Attention module.
_SDPA_OPS = {
    "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_cudnn_attention",
    "aten._flash_attention_forward", "aten._efficient_attention_forward", "aten.bmm", "aten.baddbmm",
}


def _cpu_sdpa_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _custom_mapping() -> dict:
    op = _cpu_sdpa_op()
    if op is None or op in flop_counter.flop_registry:
        return {}

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: cpu_sdpa}


def counter_notes() -> dict:
    """What the flop counter of this torch build does with attention (stored in each report)."""
    op = _cpu_sdpa_op()
    native = op is not None and op in flop_counter.flop_registry
    return {
        "tool": "torch.utils.flop_counter.FlopCounterMode (MAC = FLOP / 2), meta device",
        "counted_ops": "convolution, mm/addmm (Linear, bias adds excluded), bmm/baddbmm, SDPA kernels",
        "cpu_sdpa_native": native,
        "cpu_sdpa_patch": None if native or op is None else
        "torch's flop counter has no formula for aten._scaled_dot_product_flash_attention_for_cpu (counts 0); "
        "slimdiff registers the counter's own SDPA formula (QKᵀ + AV) for it",
        "not_counted": "normalisations, activations, softmax, elementwise adds (no MACs)",
    }


@dataclass(frozen=True)
class MacCount:
    """MACs of one UNet call at a given batch and latent size, total and by where they are spent (``attn1``:
    self-attention, ``attn2``: cross-attention, as in the SD block layout and the report format)."""

    total: int
    ffn: int
    attn1_proj: int
    attn1_products: int
    attn2_proj: int
    attn2_products: int
    params: int
    batch: int
    latent: tuple[int, int]

    @property
    def transformer(self) -> int:
        return self.ffn + self.attn1_proj + self.attn1_products + self.attn2_proj + self.attn2_products

    @property
    def other(self) -> int:
        return self.total - self.transformer

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(latent=list(self.latent), transformer=self.transformer, other=self.other)
        return d


def denoiser_class(config: dict) -> type:
    """The dense denoiser class a config names in ``_class_name`` (a slim class's dense one; a UNet when it names
    none, as the built-in UNet configs)."""
    from ..families import FAMILIES, load_builtin
    from ..slim_models import SLIM_CLASSES

    name = config.get("_class_name") or "UNet2DConditionModel"
    if name in SLIM_CLASSES:
        return SLIM_CLASSES[name].dense_class
    load_builtin()
    found = next((cls for cls in FAMILIES.registered() if issubclass(cls, nn.Module) and cls.__name__ == name), None)
    if found is None:
        raise SlimDiffError(f"no model family for a {name} config")
    return found


def meta_unet(source: nn.Module | dict, plan: RankPlan | None = None):
    """A weightless denoiser with the shapes of ``plan`` (or dense): of the class and config of a model
    ``source``, or of a config dict (read from a folder or a built-in: :func:`denoiser_class` reads its class)."""
    from ..rebuild import apply_plan_shapes

    if isinstance(source, nn.Module):  # a live model's config does not name its class
        cls = getattr(type(source), "dense_class", type(source))
    else:
        cls = denoiser_class(source)
    config = {k: v for k, v in source.config.items() if k != "rank_plan"} if isinstance(source, nn.Module) else \
        {k: v for k, v in source.items() if k != "rank_plan"}
    with torch.device("meta"):
        unet = cls.from_config(config)
    if plan is not None:
        apply_plan_shapes(unet, plan)
    return unet.eval().requires_grad_(False)


def call_macs(fn: Callable[[], object]) -> int:
    """Multiply–accumulates of ``fn()`` — any denoiser call, e.g. one a caching wrapper shortens — counted as
    :func:`count_macs` counts them (attention products on every SDPA path)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        fn()
    return counter.get_total_flops() // 2


def count_macs(unet, batch: int = 1, latent: tuple[int, int] | None = None, text_tokens: int | None = None,
               family=None) -> MacCount:
    """Count one call of ``unet`` — as ``family`` calls it (default the denoiser's own: FLUX Kontext's pipeline adds
    the reference image's tokens) — (any device; meta is fastest, and counts a slim model's own arithmetic: on the CPU
    a slim attention's heads run zero-padded to one width, :func:`~slimdiff.families.blocks.slim_attention`) on
    ``batch`` latents of ``latent`` = (h, w)
    (default: the size its pipeline samples at, :meth:`~slimdiff.families.DenoiserFamily.sample_size`) and
    ``text_tokens`` (default: its family's text length)."""
    family = family or family_for(unet)
    if latent is None:
        latent = family.sample_size(unet.config)
    h, w = latent
    param = next(unet.parameters())
    call = family.dummy_call(unet.config, batch, (h, w), text_tokens, device=param.device,
                                       dtype=param.dtype)
    # Which MacCount group each FFN / attention sub-layer feeds (self-attention: attn1, cross: attn2).
    group_of = {s.sublayer_path: "ffn" if s.kind == FFN else ("attn2" if s.attention == CROSS else "attn1")
                for s in module_sites(unet)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        unet(**call)
    groups = dict(ffn=0, attn1_proj=0, attn1_products=0, attn2_proj=0, attn2_products=0)
    for name, ops in counter.get_flop_counts().items():
        group = group_of.get(name.partition(".")[2])  # counter names are "<root class>.<module path>"
        if group == "ffn":
            groups["ffn"] += sum(ops.values())
        elif group is not None:
            products = sum(v for op, v in ops.items() if str(op) in _SDPA_OPS)
            groups[f"{group}_products"] += products
            groups[f"{group}_proj"] += sum(ops.values()) - products
    params = sum(p.numel() for p in unet.parameters())
    return MacCount(total=counter.get_total_flops() // 2, **{k: v // 2 for k, v in groups.items()},
                    params=params, batch=batch, latent=(h, w))


def ideal_table(config: dict, budgets: list[float], batches: list[int], latent: tuple[int, int], *,
                align: int = 8, r_min: int = 8, unit: str = "params", family=None, given=None) -> list[dict]:
    """Parameters, MACs and ideal speed-up (dense MACs / slim MACs) of synthetic plans (the real allocator on
    uniform scores) at each budget — shapes only, nothing is run but a meta-device forward. ``unit``: budgets
    are fractions of the compressible parameters (``params``) or of the transformer-block MACs at ``latent``
    (``macs``). ``family`` calls the denoiser (default its own: a FLUX Kontext pipeline's adds the reference
    image's tokens). ``given``: a slim folder's own plan, counted after the budgets; its rows' budget is the
    fraction of the compressible parameters it removed, and ``plan`` says it is the folder's."""
    from .plans import synthetic_plan, transformer_mac_plan

    dense_unet = meta_unet(config)
    plans = []  # (budget, plan, what made it)
    for budget in budgets:
        if budget <= 0:
            plans.append((budget, None, None))
        elif unit == "macs":
            plans.append((budget, transformer_mac_plan(dense_unet, budget, latent, align=align, r_min=r_min,
                                                       family=family), "synthetic"))
        else:
            plans.append((budget, synthetic_plan(dense_unet, budget, align=align, r_min=r_min), "synthetic"))
    if given is not None:
        plans.append((round(given.params_removed / given.compressible_params, 4), given, "given"))
    rows = []
    for budget, plan, made_by in plans:
        unet = meta_unet(config, plan)
        for batch in batches:
            dense, slim = (count_macs(m, batch, latent, family=family) for m in (dense_unet, unet))
            rows.append({"budget": budget, "batch": batch, "params": slim.params,
                         "params_removed": dense.params - slim.params, "macs": slim.to_dict(),
                         "ideal_speedup": dense.total / slim.total,
                         "removed_by_kind": plan.removed_by_kind() if plan else {},
                         "plan": made_by})
    return rows
