"""Train the proxy text-to-image model from scratch: ``python -m slimdiff.proxy.train``.

An SD-1.x-shaped ``StableDiffusionPipeline`` on the procedural shape scenes of :mod:`.shapes`:

1. tokenizer: CLIP BPE files for the closed vocabulary (:mod:`.tokenizer`);
2. VAE (``AutoencoderKL``, 64×64×3 → 16×16×4): L1 + L2 reconstruction and a small KL term, on rendered scenes;
   the latent scaling factor is set to 1 / std of the training latents;
3. the training set's latents are encoded once (posterior means);
4. UNet (``UNet2DConditionModel``: CrossAttnDownBlock2D / CrossAttnUpBlock2D, GEGLU, several heads) and a small
   ``CLIPTextModel`` trained jointly with the DDPM noise-prediction loss (SD's scaled-linear betas, Min-SNR-5
   weighting), 10 % caption dropout (empty prompt) for classifier-free guidance, EMA weights. Phase 2
   continues from phase 1's EMA weights with a fresh optimizer, a lower peak LR and a new cosine schedule
   (``--resume-from FOLDER`` runs phase 2 alone on a folder saved by a phase-1-only run, ``--unet-steps2 0``);
5. the EMA pipeline (PNDM scheduler, as SD-1.x) is written with ``save_pretrained(safe_serialization=True)``
   into a temporary folder next to ``--out`` and renamed into place.

Deterministic for a given ``--seed`` and device. Defaults are sized for about an hour on one CPU thread;
``--device cuda`` runs the same recipe on a GPU. Stage results (VAE, latents) are cached in ``--work`` so an
interrupted run resumes after the VAE.

``--preset gpu --device cuda --time-budget SECONDS`` is the one-GPU recipe (:func:`train_budgeted`, used by
``bench/proxy_gpu.py``): wider UNet and text encoder, 262 144 distinct scenes rendered by a process pool plus
their horizontal mirrors ("left of" ↔ "right of"; mirrors of held-out compositions dropped), batch 256, text
encoder at 1.5 × the UNet LR, one phase whose step count and cosine schedule are fitted to the time left after
the step time has been measured (hard stop at the budget), EMA decay scaled to the step count. Not a
bit-for-bit reproducible run: its step count depends on the measured speed (recorded in the summary).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .shapes import ShapesDataset

# ------------------------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ProxyConfig:
    # text encoder
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    # VAE (64×64×3 → 16×16×4)
    vae_channels: tuple = (16, 32, 64)
    vae_groups: int = 8
    # UNet (SD-1.x block structure at toy width)
    unet_channels: tuple = (32, 64, 128)
    unet_heads: tuple = (2, 4, 4)  # diffusers' "attention_head_dim" = number of heads per block
    unet_layers_per_block: int = 1
    unet_groups: int = 16
    # training
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    n_latents: int = 32768
    unet_steps: int = 3600
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup: int = 200
    # phase 2: the EMA weights of phase 1 trained on with a fresh optimizer, a lower peak LR and a new cosine
    unet_steps2: int = 3000
    unet_lr2: float = 2e-4
    warmup2: int = 100
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    # > 0: EMA decay 1 − 1 / (ema_fraction · total steps), within [0.999, 0.9999] (a time-budgeted run fixes the
    # step count only after it has measured its step time)
    ema_fraction: float = 0.0
    text_lr_mult: float = 1.0  # the text encoder's peak LR = unet_lr · text_lr_mult
    # horizontal-flip augmentation: every training scene also mirrored, caption "left of" ↔ "right of" (mirrors
    # whose composition is a held-out one are dropped); the VAE sees random mirrors
    hflip: bool = False
    seed: int = 0
    eval_prompts: int = 48

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


TINY = dict(  # for tests: seconds on a CPU
    text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64,
    vae_channels=(8, 16, 16), vae_groups=4, unet_channels=(32, 32, 64), unet_heads=(2, 2, 2), unet_groups=8,
    vae_steps=30, vae_batch=8, n_latents=256, unet_steps=40, unet_batch=8, warmup=5, eval_prompts=0,
    unet_steps2=0,
)
SMOKE = dict(vae_steps=40, n_latents=512, unet_steps=60, warmup=10, eval_prompts=4, unet_steps2=20, warmup2=5)
# One GPU (H100), time-budgeted (:func:`train_budgeted`): the step counts here are caps; the VAE and UNet phases
# measure their step time and fix their step count (and cosine schedule) to fit their time budgets. Wider UNet
# (≈ 7.2 M parameters) and text encoder (3 layers, width 192, 1.4 M), 2 × 262 144 training latents (every
# scene and its mirror), batch 256, one phase. About 37.5 MB of fp32 safetensors.
GPU = dict(
    text_hidden=192, text_layers=3, text_heads=4, text_intermediate=768,
    unet_channels=(48, 96, 192), unet_heads=(3, 6, 6), unet_groups=16,
    vae_steps=100_000, vae_batch=128, vae_lr=1e-3, n_latents=262_144,
    unet_steps=1_000_000, unet_batch=256, unet_lr=8e-4, text_lr_mult=1.5, warmup=300, unet_steps2=0,
    ema_fraction=0.1, hflip=True, eval_prompts=0,
)

# ------------------------------------------------------------------------------------------------------------
# Model construction
# ------------------------------------------------------------------------------------------------------------


def build_models(cfg: ProxyConfig, tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu",
        projection_dim=cfg.text_hidden, **ids))
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        block_out_channels=tuple(cfg.vae_channels), norm_num_groups=cfg.vae_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    unet = UNet2DConditionModel(
        sample_size=64 // 2 ** (n - 1), in_channels=4, out_channels=4,
        layers_per_block=cfg.unet_layers_per_block, block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=tuple(cfg.unet_heads),
        norm_num_groups=cfg.unet_groups)
    return text, vae, unet


def sd_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _Log:
    def __init__(self, quiet=False):
        self.t0, self.quiet = time.time(), quiet

    def __call__(self, msg):
        if not self.quiet:
            print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


class _StepBudget:
    """Fixes a loop's step count from its measured step time so that it ends within ``seconds``.

    Steps ``m0 .. m1`` are timed (after a device sync); at step ``m1`` (or earlier, once half the budget is gone)
    the total becomes ``m1 + margin · time left / step time`` (at most ``cap``). Until then the cosine schedule is
    held at its start (the LR warm-up should last at least ``m1`` steps), so the schedule a run gets is exactly
    the one for its final step count. :meth:`over` is the hard stop.
    """

    def __init__(self, seconds: float, cap: int, device, measure=(20, 120), margin: float = 0.97):
        self.seconds, self.cap, self.margin = float(seconds), int(cap), margin
        self.m0, self.m1 = measure
        self.t0 = time.time()
        self.total, self.fixed, self.step_time, self.ta = int(cap), False, None, None
        cuda = torch.device(device).type == "cuda"
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    def update(self, step: int) -> int:
        """Call at the start of ``step``; returns the total number of steps."""
        if self.fixed:
            return self.total
        if step == self.m0:
            self.sync()
            self.ta = time.time()
        elif self.ta is not None and (step == self.m1 or time.time() - self.t0 > 0.5 * self.seconds):
            self.sync()
            now = time.time()
            self.step_time = (now - self.ta) / (step - self.m0)
            left = self.seconds - (now - self.t0)
            self.total = max(step + 1, min(self.cap, step + int(self.margin * left / self.step_time)))
            self.fixed = True
        return self.total

    def progress(self, step: int) -> float:
        return step / max(self.total, 1) if self.fixed else 0.0

    def over(self) -> bool:
        return time.time() - self.t0 > self.seconds


def _gen(device, seed: int) -> torch.Generator:
    dev = torch.device(device)
    return torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(seed)


def tokenize_captions(tokenizer, captions) -> torch.Tensor:
    """``(n, 77)`` input ids; each distinct caption is tokenized once (the vocabulary is closed)."""
    uniq = sorted(set(captions))
    table = tokenizer(uniq, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
    pos = {c: k for k, c in enumerate(uniq)}
    return table[torch.tensor([pos[c] for c in captions], dtype=torch.long)]


# ------------------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------------------


def train_vae(vae, cfg: ProxyConfig, device, log, images: torch.Tensor | None = None,
              time_budget: float | None = None, info: dict | None = None) -> list[float]:
    """VAE reconstruction training. ``images``: a pool of ``(n, 64, 64, 3)`` uint8 images (on ``device``) to draw
    random batches from (random mirrors with ``cfg.hflip``); without it, fresh scenes of seed ``seed + 1000``.
    ``time_budget`` (seconds): ``cfg.vae_steps`` becomes a cap and the step count is fitted to the budget."""
    pooled = images is not None
    gen = _gen(device, cfg.seed + 1) if pooled else torch.Generator().manual_seed(cfg.seed + 1)
    data = None if pooled else ShapesDataset(cfg.vae_steps * cfg.vae_batch, seed=cfg.seed + 1000)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    budget = None
    if time_budget is not None:
        cuda = torch.device(device).type == "cuda"
        budget = _StepBudget(time_budget, cfg.vae_steps, device, measure=(10, 60) if cuda else (2, 6))
    vae.train()
    losses, pending = [], []
    steps, step = cfg.vae_steps, 0
    while step < steps:
        if budget is not None:
            steps = budget.update(step)
            prog = budget.progress(step)
        else:
            prog = step / cfg.vae_steps
        lr = cfg.vae_lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr
        if pooled:
            idx = torch.randint(0, images.shape[0], (cfg.vae_batch,), generator=gen, device=gen.device)
            x = images[idx.to(images.device)].permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
            if cfg.hflip:
                flip = (torch.rand(cfg.vae_batch, generator=gen, device=gen.device) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        else:
            imgs, _, _ = data.batch(step * cfg.vae_batch, cfg.vae_batch)
            x = _images_to_tensor(imgs).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=gen.device).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        pending.append(loss.detach())
        last = step == steps - 1 or (budget is not None and budget.over())
        if step % 50 == 0 or last:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending = []
            log(f"vae step {step}/{steps} loss {np.mean(losses[-50:]):.4f} (kl {kl.item():.1f})")
        step += 1
        if last:
            break
    if pending:
        losses.extend(torch.stack(pending).float().cpu().tolist())
    if info is not None:
        info.update(vae_steps_done=step, vae_step_time=budget.step_time if budget else None)
    vae.eval()
    return losses


@torch.no_grad()
def encode_dataset(vae, tokenizer, cfg: ProxyConfig, device, log, images: torch.Tensor | None = None,
                   captions=None, flip_ok=None, batch: int = 256):
    """Posterior means of the training scenes and their input ids.

    ``images`` (``(n, 64, 64, 3)`` uint8 tensor, any device), ``captions`` and ``flip_ok`` (numpy bool) come from
    :func:`~slimdiff.proxy.shapes.render_parallel`; without them scenes ``0 .. n_latents-1`` are rendered here.
    With ``cfg.hflip`` the mirrors of the scenes with ``flip_ok`` follow the originals (captions mirrored).
    """
    from .shapes import flip_allowed, flip_caption

    lats, caps = [], []
    flips, flip_caps = [], []
    data = None if images is not None else ShapesDataset(cfg.n_latents, seed=cfg.seed)
    n = images.shape[0] if images is not None else cfg.n_latents
    for start in range(0, n, batch):
        count = min(batch, n - start)
        if images is not None:
            x = images[start:start + count].to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            bcaps = list(captions[start:start + count])
            ok = np.asarray(flip_ok[start:start + count], dtype=bool)
        else:
            imgs, bcaps, scenes = data.batch(start, count)
            x = _images_to_tensor(imgs).to(device)
            ok = np.array([flip_allowed(sc) for sc in scenes], dtype=bool)
        lats.append(vae.encode(x).latent_dist.mean)
        caps.extend(bcaps)
        if cfg.hflip and ok.any():
            sel = torch.from_numpy(np.flatnonzero(ok)).to(x.device)
            flips.append(vae.encode(x[sel].flip(-1)).latent_dist.mean)
            flip_caps.extend(flip_caption(c) for c, k in zip(bcaps, ok) if k)
        if start % 65536 == 0:
            log(f"encoded {start}/{n}")
    lat = torch.cat(lats + flips)
    ids = tokenize_captions(tokenizer, caps + flip_caps)
    if images is None:
        lat = lat.cpu()
    if flips:
        log(f"hflip: {len(flip_caps)} mirrored scenes added ({n - len(flip_caps)} mirrors dropped as held-out)")
    return lat, ids


def train_unet(unet, text, latents, input_ids, scaling, tokenizer, cfg: ProxyConfig, device, log, phase: int = 1,
               time_budget: float | None = None, info: dict | None = None, log_every: int = 100):
    """Joint UNet + text-encoder training; ends with the EMA weights copied into the models.

    ``time_budget`` (seconds): the configured step count becomes a cap; the step count (and the cosine schedule)
    is fitted to the budget from the measured step time, with a hard stop at the budget. Losses are checked at
    every log point; a non-finite loss stops training and restores the last finite EMA weights.
    """
    from diffusers import DDPMScheduler

    steps, peak, warmup = (cfg.unet_steps, cfg.unet_lr, cfg.warmup) if phase == 1 else (
        cfg.unet_steps2, cfg.unet_lr2, cfg.warmup2)

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    acp = sched.alphas_cumprod.to(device)
    snr = acp / (1 - acp)
    uncond = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                       return_tensors="pt").input_ids.to(device)
    unet_params, text_params = list(unet.parameters()), list(text.parameters())
    params = unet_params + text_params
    cuda = torch.device(device).type == "cuda"
    if cfg.text_lr_mult != 1.0:
        groups = [{"params": unet_params, "lr_mult": 1.0}, {"params": text_params, "lr_mult": cfg.text_lr_mult}]
    else:
        groups = [{"params": params, "lr_mult": 1.0}]
    opt = torch.optim.AdamW(groups, lr=peak, weight_decay=1e-2, **({"fused": True} if cuda else {}))
    pdata = [p.detach() for p in params]
    ema = [p.clone() for p in pdata]
    ema_good = [e.clone() for e in ema]
    gen = _gen(device, cfg.seed + 1 + phase)
    gdev = gen.device
    latents, input_ids = latents.to(device), input_ids.to(device)
    budget = None
    if time_budget is not None:
        budget = _StepBudget(time_budget, steps, device, measure=(20, min(120, max(21, warmup))) if cuda else (2, 6))
    unet.train()
    text.train()
    losses, pending = [], []
    t0 = time.time()
    decay_max = cfg.ema_decay
    step, stopped = 0, None
    while step < steps:
        if budget is not None:
            steps = budget.update(step)
            prog = budget.progress(step)
        else:
            prog = step / max(steps, 1)
        if cfg.ema_fraction > 0 and (budget is None or budget.fixed):
            decay_max = min(0.9999, max(0.999, 1 - 1 / (cfg.ema_fraction * steps)))
        lr = peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        idx = torch.randint(0, latents.shape[0], (cfg.unet_batch,), generator=gen, device=gdev).to(device)
        x0 = latents[idx] * scaling
        ids = input_ids[idx]
        drop = (torch.rand(cfg.unet_batch, generator=gen, device=gdev) < cfg.caption_dropout).to(device)
        ids = torch.where(drop[:, None], uncond.expand_as(ids), ids)
        noise = torch.randn(x0.shape, generator=gen, device=gdev).to(device)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen, device=gdev).to(device)
        xt = sched.add_noise(x0, noise, t)
        enc = text(ids)[0]
        pred = unet(xt, t, enc).sample
        w = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (w * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(decay_max, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, pdata, 1 - decay)
        pending.append(loss.detach())
        last = step == steps - 1 or (budget is not None and budget.over())
        if step % log_every == 0 or last:
            vals = torch.stack(pending).float().cpu()
            pending = []
            with torch.no_grad():
                ema_ok = bool(torch.isfinite(torch.stack(torch._foreach_norm(ema))).all())
            if not (torch.isfinite(vals).all() and ema_ok):
                stopped = f"non-finite loss or weights at step {step}; EMA weights of step {step - len(vals)} restored"
                log("STOP: " + stopped)
                with torch.no_grad():
                    torch._foreach_copy_(ema, ema_good)
                break
            losses.extend(vals.tolist())
            with torch.no_grad():
                torch._foreach_copy_(ema_good, ema)
            el = time.time() - t0
            eta = el / (step + 1) * (steps - step - 1)
            log(f"unet phase {phase} step {step}/{steps} loss {np.mean(losses[-log_every:]):.4f} lr {lr:.2e} "
                f"({el / (step + 1):.3f}s/step, eta {eta / 60:.1f} min)")
        step += 1
        if last:
            if budget is not None and budget.over() and step < steps:
                stopped = f"time budget reached at step {step} of {steps}"
                log("STOP: " + stopped)
            break
    if pending:
        vals = torch.stack(pending).float().cpu()
        if torch.isfinite(vals).all():
            losses.extend(vals.tolist())
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    if info is not None:
        info.update(steps_done=step, steps_planned=steps, step_time=budget.step_time if budget else None,
                    seconds=time.time() - t0, ema_decay=decay_max, stopped=stopped)
    unet.eval()
    text.eval()
    return losses


# ------------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------------


def assemble_pipeline(text, vae, unet, tokenizer):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline_atomic(pipe, out, extra: dict | None = None) -> int:
    """``save_pretrained`` into a temp folder beside ``out``, then swap it in. Returns total bytes.

    The tokenizer folder also gets CLIP's ``vocab.json`` / ``merges.txt`` (for slow-tokenizer loaders).
    """
    from .tokenizer import write_tokenizer_files

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer_files(tmp / "tokenizer")
        if extra:
            (tmp / "proxy_training.json").write_text(json.dumps(extra, indent=2) + "\n")
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------


def train(cfg: ProxyConfig, out, device: str = "cpu", work=None, quiet: bool = False, threads: int | None = 1,
          resume_from=None) -> dict:
    """Run every stage and write the pipeline to ``out``. Returns a summary dict (also saved in the folder).

    ``resume_from``: a pipeline folder written by a phase-1-only run (``unet_steps2=0``); its weights are loaded
    and only phase 2 runs. With the same seed and latents this equals the one-command run.
    """
    prev_threads = torch.get_num_threads()
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    try:
        return _train(cfg, out, device, work, quiet, resume_from)
    finally:
        torch.set_num_threads(prev_threads)


def _train(cfg: ProxyConfig, out, device, work, quiet, resume_from=None) -> dict:
    from .tokenizer import build_tokenizer

    log = _Log(quiet)
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    work = Path(work) if work else Path(tempfile.gettempdir()) / f"slimdiff-proxy-work-{cfg.key()}"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(work / "tokenizer")
    text, vae, unet = build_models(cfg, tokenizer)
    if resume_from is not None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        src = Path(resume_from)
        text = CLIPTextModel.from_pretrained(src / "text_encoder")
        vae = AutoencoderKL.from_pretrained(src / "vae")
        unet = UNet2DConditionModel.from_pretrained(src / "unet")
        log(f"resuming from {src}: phase 2 only")
    text, vae, unet = text.to(device), vae.to(device), unet.to(device)
    log(f"params: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
        f"text {sum(p.numel() for p in text.parameters()) / 1e6:.2f}M, "
        f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M; work dir {work}")
    summary: dict = {"config": asdict(cfg), "device": device, "torch": torch.__version__}

    vae_ckpt, lat_ckpt = work / "vae.pt", work / "latents.pt"
    t = time.time()
    if resume_from is not None:
        vae.eval()
    elif vae_ckpt.exists():
        vae.load_state_dict(torch.load(vae_ckpt, map_location=device, weights_only=True))
        vae.eval()
        log("VAE loaded from the work dir")
    else:
        vae_losses = train_vae(vae, cfg, device, log)
        summary["vae_final_loss"] = float(np.mean(vae_losses[-20:]))
        torch.save(vae.state_dict(), vae_ckpt)
    vae.requires_grad_(False)
    summary["vae_seconds"] = time.time() - t

    t = time.time()
    if lat_ckpt.exists():
        lat, ids = torch.load(lat_ckpt, weights_only=True)
    else:
        lat, ids = encode_dataset(vae, tokenizer, cfg, device, log)
        torch.save((lat, ids), lat_ckpt)
    std = float(lat.std())
    scaling = 1.0 / std
    vae.register_to_config(scaling_factor=scaling)
    summary["latent_std"], summary["scaling_factor"] = std, scaling
    summary["encode_seconds"] = time.time() - t
    log(f"latents {tuple(lat.shape)}, std {std:.3f} → scaling_factor {scaling:.4f}")

    t = time.time()
    if resume_from is None:
        unet_losses = train_unet(unet, text, lat, ids, scaling, tokenizer, cfg, device, log, phase=1)
        summary["unet_seconds"] = time.time() - t
        summary["unet_first_loss"] = float(np.mean(unet_losses[:20]))
        summary["unet_final_loss"] = float(np.mean(unet_losses[-100:]))
    else:
        summary["resumed_from"] = json.loads((Path(resume_from) / "proxy_training.json").read_text()) if (
            Path(resume_from) / "proxy_training.json").exists() else str(resume_from)
    if cfg.unet_steps2:
        t = time.time()
        unet_losses = train_unet(unet, text, lat, ids, scaling, tokenizer, cfg, device, log, phase=2)
        summary["unet2_seconds"] = time.time() - t
        summary["unet2_first_loss"] = float(np.mean(unet_losses[:20]))
        summary["unet2_final_loss"] = float(np.mean(unet_losses[-100:]))
    summary["train_seconds"] = time.time() - t_start

    pipe = assemble_pipeline(text.cpu(), vae.cpu(), unet.cpu(), tokenizer)
    if cfg.eval_prompts:
        from .evaluate import adherence
        from .shapes import heldout_prompts

        t = time.time()
        rep = adherence(pipe, heldout_prompts(cfg.eval_prompts, seed=12345), seeds=[0])
        summary["heldout_adherence"] = rep.score
        summary["heldout_per_kind"] = rep.per_kind
        summary["eval_seconds"] = time.time() - t
        log(f"held-out adherence {rep.score:.3f} {rep.per_kind}")
    size = save_pipeline_atomic(pipe, out, summary)
    summary["bytes"] = size
    log(f"saved {out} ({size / 1e6:.1f} MB); total {(time.time() - t_start) / 60:.1f} min")
    return summary


def train_budgeted(cfg: ProxyConfig, out, device: str = "cuda", deadline: float | None = None,
                   reserve: float = 60.0, vae_seconds: float = 60.0, processes: int | None = None, log=None,
                   progress=None) -> dict:
    """The whole recipe within a wall-clock ``deadline`` (a ``time.time()`` value), for one GPU (``GPU`` preset).

    Scenes ``0 .. n_latents-1`` are rendered by a fork-based process pool while the models are built; the VAE
    trains on random (mirrored) batches of them for ``min(vae_seconds, 20 % of the time left)``; all scenes and
    their allowed mirrors are encoded; the UNet + text encoder train until ``deadline − reserve`` (step count
    fitted to the measured step time); the EMA pipeline is saved to ``out``. ``reserve`` is the time the caller
    keeps for saving and evaluation. ``progress(summary)`` is called after every stage (to write a report early).
    Returns the summary (also saved as ``proxy_training.json`` in the folder).
    """
    import multiprocessing as mp

    from .shapes import concat_rendered, render_jobs, render_range
    from .tokenizer import build_tokenizer

    log = log or _Log()
    t_start = time.time()
    deadline = deadline or t_start + 3600
    cuda = torch.device(device).type == "cuda"
    summary: dict = {"config": asdict(cfg), "device": device, "torch": torch.__version__, "stage_seconds": {}}

    def stage(name, t):
        summary["stage_seconds"][name] = round(time.time() - t, 2)
        if progress:
            progress(summary)

    t = time.time()
    jobs = render_jobs(cfg.n_latents, cfg.seed, chunk=2048)
    procs = max(1, min(len(jobs), processes or (os.cpu_count() or 2) - 1))
    pool = mp.get_context("fork").Pool(procs) if procs > 1 else None  # forked before any CUDA use
    pending = pool.map_async(render_range, jobs) if pool else None
    try:
        torch.manual_seed(cfg.seed)
        tokenizer = build_tokenizer(Path(tempfile.mkdtemp(prefix="slimdiff-proxy-tok-")))
        text, vae, unet = build_models(cfg, tokenizer)
        text, vae, unet = text.to(device), vae.to(device), unet.to(device)
        summary["params"] = {k: sum(p.numel() for p in m.parameters())
                             for k, m in (("unet", unet), ("text", text), ("vae", vae))}
        log(f"params: unet {summary['params']['unet'] / 1e6:.2f}M, text {summary['params']['text'] / 1e6:.2f}M, "
            f"vae {summary['params']['vae'] / 1e6:.2f}M; rendering {cfg.n_latents} scenes on {procs} processes")
        stage("build_models", t)
        imgs, caps, flip_ok = concat_rendered(pending.get() if pool else map(render_range, jobs))
    finally:
        if pool:
            pool.close()
            pool.join()
    images = torch.from_numpy(imgs).to(device)
    del imgs
    stage("render", t)
    log(f"rendered {len(caps)} scenes")

    t = time.time()
    vae_budget = max(1.0, min(vae_seconds, 0.2 * (deadline - time.time() - reserve)))
    info: dict = {}
    vae_losses = train_vae(vae, cfg, device, log, images=images, time_budget=vae_budget, info=info)
    vae.requires_grad_(False)
    summary.update(vae_budget_seconds=vae_budget, vae_first_loss=float(np.mean(vae_losses[:20])),
                   vae_final_loss=float(np.mean(vae_losses[-50:])), **info)
    stage("vae", t)

    t = time.time()
    lat, ids = encode_dataset(vae, tokenizer, cfg, device, log, images=images, captions=caps, flip_ok=flip_ok,
                              batch=1024 if cuda else 256)
    del images
    std = float(lat.float().std())
    scaling = 1.0 / std
    vae.register_to_config(scaling_factor=scaling)
    summary.update(n_train_latents=int(lat.shape[0]), n_scenes=len(caps), latent_std=std, scaling_factor=scaling)
    log(f"latents {tuple(lat.shape)}, std {std:.3f} → scaling_factor {scaling:.4f}")
    stage("encode", t)

    t = time.time()
    unet_budget = max(1.0, deadline - time.time() - reserve)
    info = {}
    losses = train_unet(unet, text, lat, ids, scaling, tokenizer, cfg, device, log, phase=1,
                        time_budget=unet_budget, info=info)
    del lat, ids
    k = max(1, len(losses) // 20)
    summary.update(unet_budget_seconds=unet_budget, unet=info,
                   unet_loss_curve=[[i * k, float(np.mean(losses[i * k:(i + 1) * k]))]
                                    for i in range(len(losses) // k)],
                   unet_first_loss=float(np.mean(losses[:50])) if losses else None,
                   unet_final_loss=float(np.mean(losses[-200:])) if losses else None)
    stage("unet", t)

    t = time.time()
    pipe = assemble_pipeline(text.cpu(), vae.cpu(), unet.cpu(), tokenizer)
    summary["train_seconds"] = time.time() - t_start
    summary["bytes"] = save_pipeline_atomic(pipe, out, summary)
    log(f"saved {out} ({summary['bytes'] / 1e6:.1f} MB)")
    stage("save", t)
    return summary


def main(argv=None) -> int:
    from . import PROXY_DIR

    ap = argparse.ArgumentParser(prog="python -m slimdiff.proxy.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(PROXY_DIR), help="pipeline folder to write (default: the shipped one)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--preset", choices=("full", "smoke", "tiny", "gpu"), default="full",
                    help="gpu: the time-budgeted one-GPU recipe (train_budgeted); see --time-budget")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="gpu preset: seconds for the whole run (rendering, VAE, latents, UNet, saving); "
                         "default 480")
    ap.add_argument("--reserve", type=float, default=15.0, help="gpu preset: seconds kept for saving")
    ap.add_argument("--work", default=None, help="stage cache folder (default: a temp folder keyed by config)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume-from", default=None,
                    help="pipeline folder of a phase-1-only run (--unet-steps2 0): run phase 2 on it")
    for name in ("vae_steps", "unet_steps", "unet_steps2", "unet_batch", "n_latents", "eval_prompts"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    args = ap.parse_args(argv)
    over = {"full": {}, "smoke": SMOKE, "tiny": TINY, "gpu": GPU}[args.preset]
    cfg = ProxyConfig(**over, seed=args.seed)
    for name in ("vae_steps", "unet_steps", "unet_steps2", "unet_batch", "n_latents", "eval_prompts"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.preset == "gpu" or args.time_budget is not None:
        summary = train_budgeted(cfg, args.out, device=args.device,
                                 deadline=time.time() + (args.time_budget or 480.0), reserve=args.reserve)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "unet_loss_curve")}, indent=2))
        return 0
    summary = train(cfg, args.out, device=args.device, work=args.work, threads=args.threads,
                    resume_from=args.resume_from)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
