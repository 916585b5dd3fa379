"""Stage A — SlimSet: pick calibration prompts that cover the text-embedding space (method.md §3).

Embed the pool, find its geometric median (Weiszfeld), drop the 1 % of prompts farthest from it (FPS would
otherwise spend its first picks on junk captions), then farthest-point sample in cosine distance starting
from the prompt nearest the median. Deterministic: no randomness anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import SlimDiffError
from .families import family_for

Embedder = Callable[[Sequence[str]], torch.Tensor]


def text_embedder(pipe, batch_size: int = 64) -> Embedder:
    """The pipeline's own text towers: each tower's prompt embedding (:func:`_prompt_embedding`: CLIP's pooled
    EOS output, the masked mean of a T5's token states) L2-normalised, float32; with two towers (SDXL) both side
    by side, normalised again, so cosine similarity is the mean of the towers'."""
    towers = family_for(pipe).text_towers(pipe)

    @torch.no_grad()
    def embed(prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            parts = [torch.nn.functional.normalize(_prompt_embedding(t.tokenizer, t.encoder, chunk), dim=-1)
                     for t in towers]
            out.append(parts[0] if len(parts) == 1 else torch.nn.functional.normalize(torch.cat(parts, -1), dim=-1))
        return torch.cat(out)

    return embed


def _prompt_embedding(tokenizer, encoder, prompts: list[str]) -> torch.Tensor:
    """One vector per prompt. CLIP text towers have one (the pooled EOS state, projected in
    ``CLIPTextModelWithProjection``), read as SD's pipelines call them: ids only, padded to the tokenizer's
    length. Other encoders (T5, which has no pooled output) get the mean of their last hidden states over the
    prompt's tokens: T5 was never trained to summarise a sentence in one position, every token state carries
    the prompt, and the mean over the attention mask (passed to the encoder, as PixArt's pipeline does) leaves
    padding out, so a prompt's vector does not depend on the longest prompt of its batch. The encoder class
    decides, not its output, because only the masked path passes the mask into the call."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if isinstance(encoder, (CLIPTextModel, CLIPTextModelWithProjection)):
        ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device))
        pooled = out.text_embeds if isinstance(encoder, CLIPTextModelWithProjection) else out.pooler_output
        return pooled.float().cpu()
    tokens = tokenizer(prompts, padding="longest", truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device)
    hidden = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask).last_hidden_state.float()
    weights = mask.to(hidden.dtype)[..., None]
    return ((hidden * weights).sum(1) / weights.sum(1)).cpu()


def geometric_median(points: torch.Tensor, eta: float = 1e-8, tol: float = 1e-7, max_iter: int = 500) -> torch.Tensor:
    """Weiszfeld iterations from the mean: z ← Σ e_i/max(‖e_i−z‖,η) / Σ 1/max(‖e_i−z‖,η)."""
    x = points.double()
    z = x.mean(0)
    for _ in range(max_iter):
        inv = 1.0 / (x - z).norm(dim=1).clamp_min(eta)
        z_next = (inv[:, None] * x).sum(0) / inv.sum()
        if (z_next - z).norm() < tol:
            return z_next
        z = z_next
    return z


def farthest_point_sampling(points: torch.Tensor, k: int, start: int) -> list[int]:
    """Greedy max–min selection in cosine distance 1 − eᵢᵀeⱼ (rows assumed unit-norm); ties → lowest index."""
    x = points.double()
    chosen = [start]
    nearest = 1.0 - x @ x[start]
    nearest[start] = -1.0
    for _ in range(k - 1):
        nxt = int(torch.argmax(nearest))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, 1.0 - x @ x[nxt])
        nearest[chosen] = -1.0
    return chosen


@dataclass(frozen=True)
class SlimSet:
    prompts: list[str]
    indices: list[int]  # positions in the pool the prompts were chosen from

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({"sha256": self.sha256, "indices": self.indices, "prompts": self.prompts}, indent=1)


def select_slimset(pool: Sequence[str], embeddings: torch.Tensor, k: int, outlier_fraction: float = 0.01) -> SlimSet:
    """Median-seeded farthest-point sampling of ``k`` prompts from ``pool`` (embeddings: unit rows, one per prompt)."""
    if len(pool) != len(embeddings):
        raise SlimDiffError("prompt pool and embeddings differ in length")
    if k >= len(pool):  # nothing to choose: keep the pool in its order
        return SlimSet(list(pool), list(range(len(pool))))
    median = geometric_median(embeddings)
    dist = (embeddings.double() - median).norm(dim=1)
    keep = torch.arange(len(pool))
    if outlier_fraction > 0:
        cut = torch.quantile(dist, 1.0 - outlier_fraction)
        kept = keep[dist <= cut]
        keep = kept if len(kept) >= k else keep
    sub = embeddings[keep]
    start = int(torch.argmin(dist[keep]))
    picked = [int(keep[i]) for i in farthest_point_sampling(sub, k, start)]
    return SlimSet([pool[i] for i in picked], picked)
