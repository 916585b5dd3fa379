"""Comparing what a model loaded from files draws with what its in-memory source draws."""

import numpy as np

#: Loaded weights equal their source's bit for bit, yet its images may differ in the last bits: safetensors loads
#: tensors as views into the file's bytes, at other memory alignments than fresh tensors, and the CPU's BLAS (MKL, one
#: thread, on some CPUs) sums in another order for another alignment. Images are in [0, 1]; a wrong weight or a wrong
#: call moves them by far more.
LOADED_IMAGE_TOLERANCE = 1e-5


def assert_draws_alike(loaded: np.ndarray, source: np.ndarray) -> None:
    """``loaded``'s image equals ``source``'s to :data:`LOADED_IMAGE_TOLERANCE`."""
    np.testing.assert_allclose(loaded, source, rtol=0, atol=LOADED_IMAGE_TOLERANCE)
