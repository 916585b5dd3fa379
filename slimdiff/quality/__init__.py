"""Quality harness: how close a slim model stays to its dense model.

* :mod:`.sampling` — seeded dense/slim sampling; noise-prediction error of slim UNets along the dense trajectory;
* :mod:`.metrics` — PSNR, SSIM (scikit-image), noise-error summaries;
* :mod:`.optional` — LPIPS, CLIP score, FID when their packages and local weights exist (else reported skipped);
* :mod:`.evaluate` — :func:`compare`, prompt adherence (proxy model), parameter and MAC costs;
* :mod:`.cli` — ``slimdiff eval``.
"""

from .evaluate import Comparison, EvalSettings, adherence, compare
from .metrics import fidelity, noise_error_summary, psnr, ssim
from .sampling import NoiseErrorProbe, generate

__all__ = ["Comparison", "EvalSettings", "NoiseErrorProbe", "adherence", "compare", "fidelity", "generate",
           "noise_error_summary", "psnr", "ssim"]
