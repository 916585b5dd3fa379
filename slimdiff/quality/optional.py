"""Metrics that need third-party packages and pretrained weights: LPIPS, CLIP score, FID.

Each is imported lazily and runs only when its package imports *and* its weights are on local disk — nothing
here downloads. Otherwise the metric is returned as ``{"skipped": "<reason>"}`` so a report always says why a
number is missing. (``lpips``, ``open_clip_torch``, ``clean-fid`` and ``torch-fidelity`` all depend on
torchvision.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import SlimDiffError

# Where the libraries look for their backbones; present means "no download will happen".
LPIPS_ALEXNET = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, loaded by lpips.LPIPS(net="alex")
CLEANFID_INCEPTION = Path("/tmp") / "inception-2015-12-05.pt"  # clean-fid's fixed cache location on Linux


def skipped(reason: str) -> dict:
    return {"skipped": reason}


def _import(name: str):
    try:
        return __import__(name), None
    except Exception as exc:  # ImportError, or a broken torchvision raising at import time
        return None, f"{type(exc).__name__}: {exc}"


def _nchw(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().to(device)


@torch.no_grad()
def lpips_distance(dense: np.ndarray, slims: dict[str, np.ndarray], device: str = "cpu",
                   batch_size: int = 16) -> dict:
    """LPIPS (AlexNet) of each slim image to its dense twin, when ``lpips`` and its AlexNet weights are local."""
    lpips, err = _import("lpips")
    if lpips is None:
        return skipped(f"the lpips package is not importable ({err})")
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_ALEXNET
    if not backbone.is_file():
        return skipped(f"LPIPS needs torchvision's AlexNet weights at {backbone} (not present; no download is made)")
    model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    out = {"backbone": "alex"}
    for name, images in slims.items():
        values = []
        for k in range(0, len(dense), batch_size):
            a = _nchw(dense[k:k + batch_size], device) * 2 - 1  # LPIPS expects [-1, 1]
            b = _nchw(images[k:k + batch_size], device) * 2 - 1
            values.extend(model(a, b).flatten().cpu().tolist())
        out[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    return out


@torch.no_grad()
def clip_score(images: dict[str, np.ndarray], prompts: Sequence[str], model_name: str | None,
               weights: str | None, device: str = "cpu", batch_size: int = 16) -> dict:
    """Mean cosine similarity of image and prompt embeddings under an open_clip model with local weights.

    The scale is the raw cosine (as BK-SDM's tables, e.g. 0.2958 for SD v1.4 with ViT-g/14); multiply by 100
    for the torchmetrics convention. The backbone is named in the result: scores of different backbones are
    not comparable.
    """
    if not model_name or not weights:
        return skipped("no open_clip model and local weights given (--clip-model ViT-L-14 --clip-weights FILE)")
    open_clip, err = _import("open_clip")
    if open_clip is None:
        return skipped(f"open_clip is not importable ({err})")
    if not Path(weights).is_file():
        raise SlimDiffError(f"CLIP weights {weights!r} do not exist")
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    text = []
    for k in range(0, len(prompts), batch_size):
        text.append(model.encode_text(tokenizer(list(prompts[k:k + batch_size])).to(device)).float())
    text = torch.nn.functional.normalize(torch.cat(text), dim=-1)
    out = {"backbone": model_name, "weights": str(weights), "scale": "cosine similarity (x100 for torchmetrics)"}
    for name, imgs in images.items():
        feats = []
        for k in range(0, len(imgs), batch_size):
            pil = [Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in imgs[k:k + batch_size]]
            feats.append(model.encode_image(torch.stack([preprocess(p) for p in pil]).to(device)).float())
        feats = torch.nn.functional.normalize(torch.cat(feats), dim=-1)
        out[name] = float((feats * text).sum(-1).mean())
    return out


def fid(folders: dict[str, Path], real: str | None, weights: str | None, device: str = "cpu") -> dict:
    """FID of each folder of generated PNGs against ``real`` (a folder of real images).

    clean-fid is used when its Inception file is already at :data:`CLEANFID_INCEPTION`; otherwise
    torch-fidelity with ``weights`` (its Inception ``.pth``). Fewer images than the 2048 feature dimensions give
    a rank-deficient covariance: such values are only comparable to each other, not to published numbers.
    """
    if not real:
        return skipped("no folder of real images given (--fid-real DIR)")
    if not Path(real).is_dir():
        raise SlimDiffError(f"real-image folder {real!r} does not exist")
    reasons = []
    cleanfid, err = _import("cleanfid")
    if cleanfid is None:
        reasons.append(f"clean-fid is not importable ({err})")
    elif not CLEANFID_INCEPTION.is_file():
        reasons.append(f"clean-fid would download its Inception weights (not at {CLEANFID_INCEPTION})")
    else:
        from cleanfid import fid as cfid

        values = {name: float(cfid.compute_fid(str(d), str(real), mode="clean", device=torch.device(device),
                                               num_workers=0, verbose=False)) for name, d in folders.items()}
        return {"library": "clean-fid (mode=clean)", "real": str(real), **values}
    tfid, err = _import("torch_fidelity")
    if tfid is None:
        reasons.append(f"torch-fidelity is not importable ({err})")
    elif not weights or not Path(weights).is_file():
        reasons.append("torch-fidelity needs its Inception weights file (--fid-weights FILE)")
    else:
        values = {}
        for name, d in folders.items():
            metrics = tfid.calculate_metrics(input1=str(d), input2=str(real), fid=True, verbose=False,
                                             cuda=str(device).startswith("cuda"),
                                             feature_extractor_weights_path=str(weights))
            values[name] = float(metrics["frechet_inception_distance"])
        return {"library": "torch-fidelity", "real": str(real), **values}
    return skipped("; ".join(reasons))

