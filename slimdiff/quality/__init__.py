"""Quality harness: how close a slim model stays to its dense model.

* :mod:`.sampling` — seeded dense/slim sampling; noise-prediction error of slim UNets along the dense trajectory;
* :mod:`.metrics` — PSNR, SSIM (scikit-image), noise-error summaries;
* :mod:`.optional` — LPIPS, CLIP score, FID when their packages and local weights exist (else reported skipped);
* :mod:`.evaluate` — :func:`compare`, prompt adherence (proxy model), parameter and MAC costs;
* :mod:`.cli` — ``slimdiff eval``.
"""

from ..lazy import lazy_attributes

# Public names are imported lazily: the ``slimdiff`` parser imports ``quality.cli``, which must not pull in
# torch, scikit-image or the sampling code just to list its flags.
_EXPORTS = {
    "Comparison": "evaluate", "EvalSettings": "evaluate", "adherence": "evaluate", "compare": "evaluate",
    "fidelity": "metrics", "noise_error_summary": "metrics", "psnr": "metrics", "ssim": "metrics",
    "NoiseErrorProbe": "sampling", "generate": "sampling",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes(__name__, _EXPORTS)
