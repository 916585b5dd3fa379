"""Two studies on top of the latency table, run by the GPU suite (and on CPU for a dry run):

* :func:`alignment_sweep` — at one parameter budget, ranks restricted to multiples of 8/16/32/64 (the real
  allocator with that alignment and floor), an off-grid variant (every cut rank one below the 8-aligned plan),
  and zero-padding of per-head widths to equal q·k/v multiples of 8 or 64 (:func:`slimdiff.export.align
  .align_head_widths`, which keeps outputs exact) — the UNet latency of each, eager, same inputs.
* :func:`compare_allocators` — the parameter-budget allocator against the latency-budget allocator aimed at
  the parameter plan's measured speed-up: parameters removed, predicted error and measured latency of both.

Slim models here are synthetic (uniform scores, seeded weights) unless allocation items from calibration
are passed: latency is real, the error of a synthetic plan is the stated proxy (fraction of width removed).
"""

from __future__ import annotations

import gc
import statistics

import torch
from torch import nn

from ..models import module_sites
from ..plan import RankPlan
from .latency_table import LatencyModel, latency_budget_ranks, predicted_error, proxy_items
from .macs import count_macs, meta_unet
from .plans import seeded_slim_copy, synthetic_plan
from .timing import cuda_graphed, is_cuda, time_calls


def unet_inputs(unet, latent, batch: int, device, dtype, text_len: int = 77, seed: int = 0):
    cfg = unet.config
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, *latent, generator=gen).to(device, dtype),
            torch.full((batch,), 500.0, device=device),
            torch.randn(batch, text_len, cfg.cross_attention_dim, generator=gen).to(device, dtype))


def eager_ms(unet, inputs, device, warmup: int, iters: int) -> dict:
    """UNet latency, eager PyTorch replayed from a CUDA graph on a GPU (launch cost would hide width)."""
    sample, t, ctx = inputs
    run = cuda_graphed(lambda: unet(sample, t, encoder_hidden_states=ctx), device)
    return time_calls(run, device, warmup, iters).to_dict()


def _widths(unet) -> dict[str, list[int]]:
    """Distinct per-head widths (q·k and v) and FFN widths of a model, as they run."""
    from diffusers.models.attention_processor import Attention

    heads, ffn = set(), set()
    for _, m in unet.named_modules():
        if isinstance(m, Attention):
            heads.add((m.to_q.out_features // m.heads, m.to_v.out_features // m.heads))
    for s in module_sites(unet):
        if s.kind == "ffn":
            ffn.add(s.width)
    return {"head_widths_qk_v": sorted(heads), "ffn_widths": sorted(ffn)}


def _free(device) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def alignment_sweep(unet, latent, budget: float = 0.4, aligns=(8, 16, 32, 64), *, batch: int = 2, device="cpu",
                    warmup: int = 3, iters: int = 20, seed: int = 0, log=None) -> dict:
    from ..export.align import align_head_widths

    log = log or (lambda msg: None)
    dtype = next(unet.parameters()).dtype
    inputs = unet_inputs(unet, latent, batch, device, dtype, seed=seed)
    dense_params = sum(p.numel() for p in unet.parameters())
    out = {"budget": budget, "batch": batch, "dense": eager_ms(unet, inputs, device, warmup, iters), "variants": []}

    def measure(label: str, model: nn.Module, plan: RankPlan, note: str) -> None:
        timing = eager_ms(model, inputs, device, warmup, iters)
        stored = sum(p.numel() for p in model.parameters())
        out["variants"].append({
            "variant": label, "note": note, "params_removed": plan.params_removed,
            "stored_params_removed": dense_params - stored,
            "gmac": count_macs(meta_unet(unet, plan), batch, latent).total / 1e9,
            "unet": timing, "speedup": out["dense"]["median_ms"] / timing["median_ms"], **_widths(model)})
        log(f"alignment {label}: {timing['median_ms']:.2f} ms")

    base = None
    for a in aligns:
        plan = synthetic_plan(unet, budget, align=a, r_min=a)
        model = seeded_slim_copy(unet, plan, seed)
        measure(f"align-{a}", model, plan, f"allocator with align={a}, r_min={a}")
        if a == 8:
            base = plan
        del model
        _free(device)
    if base is None:
        base = synthetic_plan(unet, budget, align=8, r_min=8)
    sites = module_sites(unet)
    off = {n: (e.rank - 1 if e.rank < e.width else e.rank) for n, e in base.modules.items()}
    plan = RankPlan.from_ranks(sites, off, info={"source": "synthetic", "variant": "off-grid"})
    model = seeded_slim_copy(unet, plan, seed)
    measure("off-grid", model, plan, "every cut rank of the align-8 plan minus one (odd widths)")
    del model
    for m in (8, 64):
        model = seeded_slim_copy(unet, base, seed)
        align_head_widths(model, multiple=m, equal_qk_v=True)
        measure(f"pad-equal-{m}", model, base, f"align-8 plan, per-head q·k and v zero-padded to one multiple of {m}")
        del model
        _free(device)
    return out


def compare_allocators(unet, table: dict, latent, budget: float = 0.4, *, items=None, batch: int = 2,
                       device="cpu", warmup: int = 3, iters: int = 20, seed: int = 0, r_min: int = 8,
                       align: int = 8, log=None) -> dict:
    """Parameter budget vs latency budget at the parameter plan's measured speed-up (eager)."""
    log = log or (lambda msg: None)
    dtype = next(unet.parameters()).dtype
    inputs = unet_inputs(unet, latent, batch, device, dtype, seed=seed)
    items = items or proxy_items(unet)
    latency = LatencyModel(table, unet, latent)
    dense = eager_ms(unet, inputs, device, warmup, iters)
    param_plan = synthetic_plan(unet, budget, align=align, r_min=r_min)
    param_ranks = {n: e.rank for n, e in param_plan.modules.items()}
    model = seeded_slim_copy(unet, param_plan, seed)
    param_ms = eager_ms(model, inputs, device, warmup, iters)
    del model
    _free(device)
    target = dense["median_ms"] / param_ms["median_ms"]
    out = {"budget": budget, "batch": batch, "dense": dense, "table_dense_ms": latency.dense_ms,
           "error_proxy": "relative error = fraction of width removed" if items[0].score == 0.0 else "calibrated",
           "target_speedup": target}

    def entry(plan_ranks, timing):
        removed = sum((s.width - plan_ranks[s.name]) * s.unit_params for s in module_sites(unet))
        return {"params_removed": removed, "predicted_error": predicted_error(items, plan_ranks),
                "predicted_speedup": latency.predict_speedup(plan_ranks), "unet": timing,
                "measured_speedup": dense["median_ms"] / timing["median_ms"]}

    out["param_allocator"] = entry(param_ranks, param_ms)
    if target <= 1.0:
        out["latency_allocator"] = None
        out["note"] = f"the parameter plan measured no speed-up ({target:.3f}×): nothing to match"
        return out
    try:
        ranks, info = latency_budget_ranks(items, latency, target, r_min=r_min, align=align)
    except Exception as exc:  # an unreachable target is a result, not a crash of the suite
        out["latency_allocator"] = None
        out["note"] = str(exc)
        return out
    model = seeded_slim_copy(unet, RankPlan.from_ranks(module_sites(unet), ranks), seed)
    out["latency_allocator"] = {**entry(ranks, eager_ms(model, inputs, device, warmup, iters)), "info": info}
    del model
    _free(device)
    log(f"allocators at {target:.3f}×: params removed {out['param_allocator']['params_removed'] / 1e6:.1f} M "
        f"(parameter budget) vs {out['latency_allocator']['params_removed'] / 1e6:.1f} M (latency budget)")
    return out


def transformer_macs_removed(unet, plan: RankPlan, latent, *, batch: int = 1) -> float:
    """The fraction of ``unet``'s transformer-block MACs that ``plan`` removes, counted by :class:`MacCount`
    (what :func:`~slimdiff.bench.plans.transformer_mac_plan` asked for, after alignment rounded it)."""
    dense = count_macs(meta_unet(unet), batch, latent).transformer
    return 1 - count_macs(meta_unet(unet, plan), batch, latent).transformer / dense


# Which SDPA kernel runs: the aten op each backend dispatches to (CPU and CUDA names).
SDPA_BACKEND_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> str:
    """The SDPA backend PyTorch's dispatcher picks for these tensors (read from the profiler's op names)."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, k, v, scale=scale)
    names = {e.key for e in prof.key_averages()}
    found = [label for op, label in SDPA_BACKEND_OPS.items() if op in names]
    return found[0] if found else "math"  # the math path is plain bmm/softmax ops under the composite


def _pad_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def attention_backend_study(unet, latent, *, batch: int = 2, device="cpu", warmup: int = 3, iters: int = 20,
                            buckets=(64,), seed: int = 0, log=None) -> list[dict]:
    """Per distinct slim head shape of ``unet`` (q·k width, v width, query/key tokens, heads): the SDPA backend
    at native widths and with q·k and v zero-padded to one width (the wider, and the next multiple of each of
    ``buckets``), the SDPA latency of each (interleaved with native) and the largest output difference of the
    padded call against the native one (exact in exact arithmetic: zero columns add nothing to a logit, and the
    softmax scale stays the native 1/√(q·k width); the extra v columns are zeros that the output projection
    drops)."""
    from diffusers.models.attention_processor import Attention

    from .timing import speedup_interval, time_interleaved

    log = log or (lambda msg: None)
    dtype = next(unet.parameters()).dtype
    geometry = _attention_tokens(unet, latent)
    shapes = {}
    for path, m in unet.named_modules():
        if isinstance(m, Attention) and path in geometry:
            qk, v = m.to_q.out_features // m.heads, m.to_v.out_features // m.heads
            shapes.setdefault((m.heads, qk, v, *geometry[path]), []).append(path)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for (heads, qk, v, lq, lk), paths in sorted(shapes.items()):
        q = torch.randn(batch, heads, lq, qk, generator=gen).to(device, dtype)
        k = torch.randn(batch, heads, lk, qk, generator=gen).to(device, dtype)
        val = torch.randn(batch, heads, lk, v, generator=gen).to(device, dtype)
        scale = qk ** -0.5
        native = {"backend": sdpa_backend(q, k, val, scale)}
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, val, scale=scale)
        row = {"heads": heads, "qk_width": qk, "v_width": v, "query_tokens": lq, "key_tokens": lk,
               "modules": len(paths), "native": native, "padded": []}
        widths = sorted({max(qk, v), *(-(-max(qk, v) // b) * b for b in buckets)})
        for width in widths:
            if width == qk == v:
                continue
            qp, kp, vp = _pad_heads(q, width), _pad_heads(k, width), _pad_heads(val, width)
            out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, scale=scale)[..., :v]
            native_ms, padded_ms = time_interleaved(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, val, scale=scale),
                lambda: torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, scale=scale),
                device, warmup, max(iters, 2))
            interval = speedup_interval(native_ms, padded_ms, seed=seed)
            row["padded"].append({"width": width, "backend": sdpa_backend(qp, kp, vp, scale),
                                  "max_abs_diff": float((out - ref).abs().max()),
                                  "native_ms": statistics.median(native_ms),
                                  "padded_ms": statistics.median(padded_ms),
                                  "speedup_of_padding": interval})
        log(f"attention {heads}×({qk},{v}) {lq}→{lk}: {native['backend']}; padded: "
            + ", ".join(f"{p['width']} {p['backend']} {p['speedup_of_padding']['speedup']:.2f}×"
                        for p in row["padded"]))
        rows.append(row)
    return rows


def _attention_tokens(unet, latent, text_len: int = 77) -> dict[str, tuple[int, int]]:
    """Query and key token counts of every attention of ``unet`` at ``latent`` (one meta-device forward)."""
    from diffusers.models.attention_processor import Attention

    from .macs import meta_unet as _meta

    meta = _meta(unet.config)
    found: dict[str, tuple[int, int]] = {}
    handles = []
    for path, m in meta.named_modules():
        if isinstance(m, Attention):
            def record(module, args, kwargs, path=path):
                x = args[0] if args else kwargs["hidden_states"]
                ctx = kwargs.get("encoder_hidden_states")
                lq = x.shape[1] if x.ndim == 3 else x.shape[2] * x.shape[3]
                found[path] = (lq, ctx.shape[1] if ctx is not None else lq)
            handles.append(m.register_forward_pre_hook(record, with_kwargs=True))
    cfg = meta.config
    extra = {}
    if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL: pooled text embeddings + size ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled, device="meta"),
                                      "time_ids": torch.empty(1, 6, device="meta")}
    try:
        with torch.no_grad():
            meta(torch.empty(1, cfg.in_channels, *latent, device="meta"), torch.tensor([500.0], device="meta"),
                 encoder_hidden_states=torch.empty(1, text_len, cfg.cross_attention_dim, device="meta"), **extra)
    finally:
        for h in handles:
            h.remove()
    return found
