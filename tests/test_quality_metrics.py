"""PSNR / SSIM / summaries against values known in closed form."""

import math

import numpy as np
import pytest

from slimdiff.errors import SlimDiffError
from slimdiff.quality.metrics import (
    PSNR_CAP_DB,
    capped_psnrs,
    fidelity,
    mean_and_stderr,
    noise_error_summary,
    psnr,
    ssim,
)


def _image(seed=0, size=32):
    return np.random.default_rng(seed).uniform(0.2, 0.8, (size, size, 3))


def test_psnr_of_known_perturbations():
    a = _image()
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01 → 10·log10(1/0.01)
    b = a.copy()
    b[:, : a.shape[1] // 2] += 0.05  # half the pixels off by 0.05 → MSE 0.00125
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.00125), abs=1e-9)
    assert psnr(a, a) == math.inf


def test_ssim_identity_symmetry_and_known_constant_value():
    a, b = _image(0), _image(1)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert ssim(a, b) < 0.5
    assert ssim(a, a + 0.01 * (b - 0.5)) > ssim(a, a + 0.2 * (b - 0.5))
    # constant images: only the luminance term is left, (2·μx·μy + C1) / (μx² + μy² + C1), C1 = (0.01·1)²
    x, y = np.full((32, 32, 3), 0.5), np.full((32, 32, 3), 0.6)
    c1 = 0.01 ** 2
    assert ssim(x, y) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), abs=1e-9)


def test_shape_checks():
    with pytest.raises(SlimDiffError):
        psnr(_image(size=32), _image(size=16))
    with pytest.raises(SlimDiffError):
        ssim(_image(size=8), _image(size=8))


def test_fidelity_counts_identical_pairs_at_the_cap():
    a = np.stack([_image(0), _image(1)])
    b = a.copy()
    b[1] += 0.1
    f = fidelity(a, b)
    assert f["psnr_db"]["identical_pairs"] == 1
    assert f["psnr_db"]["mean"] == pytest.approx((PSNR_CAP_DB + 20.0) / 2)
    assert f["per_image"]["psnr_db"][0] is None
    assert f["ssim"]["mean"] < 1.0 and f["ssim"]["n"] == 2


def test_noise_error_summary():
    errors = np.array([[0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.1, 0.0]])
    s = noise_error_summary(errors, [900, 600, 300, 1])
    assert s["mean"] == pytest.approx(0.2)
    assert s["per_step"] == pytest.approx([0.2, 0.2, 0.2, 0.2])
    assert s["first_half"] == pytest.approx(0.2) and s["timesteps"] == [900, 600, 300, 1]
    with pytest.raises(SlimDiffError):
        noise_error_summary(errors, [1, 2])


def test_per_image_psnrs_are_capped_and_summarised_with_their_standard_error():
    rng = np.random.default_rng(0)
    dense = rng.random((3, 16, 16, 3))
    other = dense.copy()
    other[1] += 0.01  # 40 dB
    other[2] += 0.1  # 20 dB
    values = capped_psnrs(fidelity(dense, other))
    assert values[0] == PSNR_CAP_DB  # the identical pair, at the cap fidelity's mean uses
    assert values[1:] == pytest.approx([40.0, 20.0])
    summary = mean_and_stderr(values)
    assert summary["mean"] == pytest.approx((PSNR_CAP_DB + 60) / 3)
    assert summary["stderr"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(3))
    assert mean_and_stderr(np.array([5.0])) == {"mean": 5.0, "stderr": None}
