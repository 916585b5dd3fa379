"""An engine against the ONNX graph it was built from, through Polygraphy's ``Comparator``.

The reference is ONNX Runtime on the CPU running the exported graph; the other side is the engine's own
Polygraphy runner (:meth:`~slimdiff.engines.base.Backend.polygraphy_runner`: ``OnnxrtRunner`` for ONNX Runtime
engines, ``TrtRunner`` for TensorRT) — ``polygraphy run unet.onnx --onnxrt --trt`` as a library call. The
error is measured as the export's parity check measures it: largest absolute difference, and that relative to
the reference's largest magnitude (the worst output of an engine with several).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..export.modules import Component


def compare_with_onnx(runner, onnx_path: Path, component: Component, values: dict[str, int], dtype,
                      seed: int = 5) -> dict:
    """Run ``runner`` and ONNX Runtime on ``onnx_path`` with the same seeded inputs at axis sizes ``values``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    feeds = {s.name: t.cpu().numpy() for s, t in zip(component.inputs, component.random_inputs(values, dtype, seed))}
    reference = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name="onnx-reference")
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # Polygraphy narrates every run at INFO
        results = Comparator.run([reference, runner], data_loader=[feeds])
    (_, [expected]), (name, [got]) = results.items()
    worst_abs = worst_rel = 0.0
    for output in component.outputs:
        ref = np.asarray(expected[output], dtype=np.float64)
        err = float(np.abs(np.asarray(got[output], dtype=np.float64) - ref).max())
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / max(float(np.abs(ref).max()), 1e-12))
    return {"runner": name, "shape": values, "max_abs_error": worst_abs, "max_rel_error": worst_rel}
