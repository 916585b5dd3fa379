"""Export dense and slim denoisers (UNets, DiTs; plus text encoder and VAE decoder) to ONNX, the input of engine builds.

* :mod:`.onnx` — opset-23 fused graphs (opset-18 fallback), dynamic shapes, sidecar JSON, parity check.
* :mod:`.align` — zero-padding head widths to multiples of 8 for fused-attention kernels.
* :mod:`.ort_session` — the ONNX Runtime sessions the parity check and the ``ort`` backend share.

``slimdiff-export`` (:mod:`slimdiff.cli.export`) drives export and engine builds.

Engines are built by the backends of :mod:`slimdiff.engines` and served by :mod:`slimdiff.runtime`.
"""

from ..lazy import lazy_attributes

# Imported lazily: `slimdiff-export --help` imports this package and must not pull in torch's
# exporter, onnx or diffusers to list its flags.
_EXPORTS = {
    "align_head_widths": "align", "text_encoder_component": "modules", "denoiser_component": "modules",
    "vae_decoder_component": "modules", "DEFAULT_OPSET": "onnx", "FALLBACK_OPSET": "onnx", "export_onnx": "onnx",
    "load_sidecar": "onnx", "Profile": "shapes", "Range": "shapes", "parse_profiles": "shapes",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes(__name__, _EXPORTS)
