"""What the GPU suite measures beside the timed plans (and runs on CPU for its dry run):

* :func:`transformer_macs_removed` — the fraction of the transformer-block MACs a plan removes.
* :func:`attention_backend_study` — per slim head shape, the SDPA kernel that runs at native q·k / v widths and
  with both zero-padded to one width (exact), and the latency of each.
"""

from __future__ import annotations

import statistics

import torch

from ..plan import RankPlan
from .macs import count_macs, meta_unet


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


def attention_core_study(unet, latent, *, batch: int = 2, device="cpu", warmup: int = 3, iters: int = 20,
                         floor: int = 8, seed: int = 0, log=None) -> list[dict]:
    """Per distinct attention shape of the dense ``unet`` (heads, head width, query/key tokens): the latency of the
    attention core alone (SDPA) at the native width, with q·k and v at ``floor`` — where rank plans stop — and with
    half the heads at ``floor``, each pair timed interleaved. What the core keeps at the floor is what no rank plan
    removes; what half the heads saves there is what dropping whole heads, which slimdiff does not do, could add."""
    from diffusers.models.attention_processor import Attention

    from .timing import speedup_interval, time_interleaved

    log = log or (lambda msg: None)
    dtype = next(unet.parameters()).dtype
    geometry = _attention_tokens(unet, latent)
    shapes: dict[tuple[int, int, int, int], int] = {}
    for path, m in unet.named_modules():
        if isinstance(m, Attention) and path in geometry:
            key = (m.heads, m.to_q.out_features // m.heads, *geometry[path])
            shapes[key] = shapes.get(key, 0) + 1
    gen = torch.Generator().manual_seed(seed)

    def call(heads: int, width: int, lq: int, lk: int):
        q, k, v = (torch.randn(batch, heads, n, width, generator=gen).to(device, dtype) for n in (lq, lk, lk))
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)

    rows = []
    for (heads, width, lq, lk), modules in sorted(shapes.items()):
        native, narrow, halved = (call(heads, width, lq, lk), call(heads, floor, lq, lk),
                                  call(max(1, heads // 2), floor, lq, lk))
        native_ms, narrow_ms = time_interleaved(native, narrow, device, warmup, max(iters, 2))
        narrow_again_ms, halved_ms = time_interleaved(narrow, halved, device, warmup, max(iters, 2))
        row = {"heads": heads, "width": width, "query_tokens": lq, "key_tokens": lk, "modules": modules,
               "native_ms": statistics.median(native_ms), "floor_ms": statistics.median(narrow_ms),
               "half_heads_floor_ms": statistics.median(halved_ms),
               "floor_vs_native": speedup_interval(native_ms, narrow_ms, seed=seed),
               "half_heads_vs_floor": speedup_interval(narrow_again_ms, halved_ms, seed=seed)}
        log(f"attention core {heads}×{width} {lq}→{lk} ({modules} modules): {row['native_ms']:.3f} ms, "
            f"{row['floor_ms']:.3f} at width {floor}, {row['half_heads_floor_ms']:.3f} with {heads // 2} heads")
        rows.append(row)
    return rows
