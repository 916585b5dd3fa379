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
from dataclasses import asdict, dataclass, field
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


# ------------------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------------------


def train_vae(vae, cfg: ProxyConfig, device, log) -> list[float]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    data = ShapesDataset(cfg.vae_steps * cfg.vae_batch, seed=cfg.seed + 1000)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    losses = []
    for step in range(cfg.vae_steps):
        lr = cfg.vae_lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        imgs, _, _ = data.batch(step * cfg.vae_batch, cfg.vae_batch)
        x = _images_to_tensor(imgs).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} loss {np.mean(losses[-50:]):.4f} (kl {kl.item():.1f})")
    vae.eval()
    return losses


@torch.no_grad()
def encode_dataset(vae, tokenizer, cfg: ProxyConfig, device, log):
    data = ShapesDataset(cfg.n_latents, seed=cfg.seed)
    lats, ids, bs = [], [], 256
    for start in range(0, cfg.n_latents, bs):
        imgs, caps, _ = data.batch(start, min(bs, cfg.n_latents - start))
        lats.append(vae.encode(_images_to_tensor(imgs).to(device)).latent_dist.mean.cpu())
        ids.append(tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids)
        if start % 8192 == 0:
            log(f"encoded {start}/{cfg.n_latents}")
    lat = torch.cat(lats)
    return lat, torch.cat(ids)


def train_unet(unet, text, latents, input_ids, scaling, tokenizer, cfg: ProxyConfig, device, log, phase: int = 1):
    """Joint UNet + text-encoder training; ends with the EMA weights copied into the models."""
    from diffusers import DDPMScheduler

    steps, peak, warmup = (cfg.unet_steps, cfg.unet_lr, cfg.warmup) if phase == 1 else (
        cfg.unet_steps2, cfg.unet_lr2, cfg.warmup2)

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    acp = sched.alphas_cumprod.to(device)
    snr = acp / (1 - acp)
    uncond = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                       return_tensors="pt").input_ids.to(device)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(cfg.seed + 1 + phase)
    latents, input_ids = latents.to(device), input_ids.to(device)
    unet.train()
    text.train()
    losses = []
    t0 = time.time()
    for step in range(steps):
        prog = step / max(steps, 1)
        lr = peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, latents.shape[0], (cfg.unet_batch,), generator=gen).to(device)
        x0 = latents[idx] * scaling
        ids = input_ids[idx]
        drop = (torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout).to(device)
        ids = torch.where(drop[:, None], uncond.expand_as(ids), ids)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen).to(device)
        xt = sched.add_noise(x0, noise, t)
        enc = text(ids)[0]
        pred = unet(xt, t, enc).sample
        w = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (w * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - t0
            eta = el / (step + 1) * (steps - step - 1)
            log(f"unet phase {phase} step {step}/{steps} loss {np.mean(losses[-100:]):.4f} lr {lr:.2e} "
                f"({el / (step + 1):.2f}s/step, eta {eta / 60:.1f} min)")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
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
        vae.load_state_dict(torch.load(vae_ckpt, map_location=device))
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
        lat, ids = torch.load(lat_ckpt)
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


def main(argv=None) -> int:
    from . import PROXY_DIR

    ap = argparse.ArgumentParser(prog="python -m slimdiff.proxy.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(PROXY_DIR), help="pipeline folder to write (default: the shipped one)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--preset", choices=("full", "smoke", "tiny"), default="full")
    ap.add_argument("--work", default=None, help="stage cache folder (default: a temp folder keyed by config)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume-from", default=None,
                    help="pipeline folder of a phase-1-only run (--unet-steps2 0): run phase 2 on it")
    for name in ("vae_steps", "unet_steps", "unet_steps2", "unet_batch", "n_latents", "eval_prompts"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    args = ap.parse_args(argv)
    over = {"full": {}, "smoke": SMOKE, "tiny": TINY}[args.preset]
    cfg = ProxyConfig(**over, seed=args.seed)
    for name in ("vae_steps", "unet_steps", "unet_steps2", "unet_batch", "n_latents", "eval_prompts"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    summary = train(cfg, args.out, device=args.device, work=args.work, threads=args.threads,
                    resume_from=args.resume_from)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
