"""Fidelity of slim samples to dense samples from identical seeds, and the noise-prediction error summary.

Images are HWC float arrays in [0, 1] (what ``pipe(..., output_type="np")`` returns). PSNR and SSIM come from
scikit-image; SSIM uses the settings of Wang et al. (2004): an 11×11 Gaussian window with σ = 1.5, K1 = 0.01,
K2 = 0.03, population covariances, averaged over the RGB channels.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ..errors import SlimDiffError

# An identical pair has infinite PSNR; for averages we count it at this value (float32 images that differ in one
# pixel by one part in 10⁵ already sit near 100 dB) and report how many pairs were identical.
PSNR_CAP_DB = 100.0


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise SlimDiffError(f"image pair must be two HxWx3 arrays of one shape, got {a.shape} and {b.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; ``inf`` for identical images."""
    a, b = _check_pair(a, b)
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Gaussian window, Wang et al. settings) of two images in [0, 1]."""
    a, b = _check_pair(a, b)
    if min(a.shape[:2]) < 11:
        raise SlimDiffError(f"SSIM needs images of at least 11x11 pixels, got {a.shape[0]}x{a.shape[1]}")
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()),
            "median": float(np.median(arr)), "n": int(arr.size)}


def fidelity(dense: np.ndarray, slim: np.ndarray) -> dict:
    """PSNR and SSIM of every slim image against the dense image of the same prompt and seed."""
    if len(dense) != len(slim) or len(dense) == 0:
        raise SlimDiffError(f"need matching, non-empty image lists, got {len(dense)} dense and {len(slim)} slim")
    p = [psnr(d, s) for d, s in zip(dense, slim)]
    identical = sum(math.isinf(v) for v in p)
    psnr_summary = _summary([min(v, PSNR_CAP_DB) for v in p])
    psnr_summary.update(identical_pairs=identical, cap_db=PSNR_CAP_DB)
    return {"psnr_db": psnr_summary, "ssim": _summary([ssim(d, s) for d, s in zip(dense, slim)]),
            "per_image": {"psnr_db": [None if math.isinf(v) else v for v in p]}}


def capped_psnrs(fid: dict) -> np.ndarray:
    """Per-image PSNR in dB of a :func:`fidelity` result, identical pairs at :data:`PSNR_CAP_DB`: what means and
    paired differences between variants are taken of."""
    return np.array([PSNR_CAP_DB if v is None else v for v in fid["per_image"]["psnr_db"]], dtype=np.float64)


def mean_and_stderr(values: np.ndarray) -> dict:
    """``{"mean", "stderr"}`` of per-image values (the standard error of the mean; None for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return {"mean": float(values.mean()), "stderr": stderr}


def noise_error_summary(errors: np.ndarray, timesteps: list[int]) -> dict:
    """``errors`` is (images, UNet calls) of ‖ε_slim − ε_dense‖ / ‖ε_dense‖ along the dense trajectory."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2 or errors.shape[1] != len(timesteps):
        raise SlimDiffError(f"noise errors of shape {errors.shape} do not match {len(timesteps)} timesteps")
    return {"mean": float(errors.mean()), "per_step": [float(v) for v in errors.mean(axis=0)],
            "per_step_std": [float(v) for v in errors.std(axis=0)], "timesteps": [int(t) for t in timesteps],
            "first_half": float(errors[:, : errors.shape[1] // 2].mean()) if errors.shape[1] > 1 else None,
            "second_half": float(errors[:, errors.shape[1] // 2:].mean())}
