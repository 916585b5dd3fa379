"""Export dense and slim UNets (plus text encoder and VAE decoder) to ONNX and build inference engines.

* :mod:`.onnx` — opset-23 fused graphs (opset-18 fallback), dynamic shapes, sidecar JSON, parity check.
* :mod:`.ort` — ONNX Runtime engines (CPU / CUDA), optimized graph saved next to the engine.
* :mod:`.trt` — TensorRT FP16 engines: one optimization profile per shape range, reused timing cache,
  metadata checked against the running TensorRT and GPU.
* :mod:`.aoti` — AOTInductor packages, loadable without the Python model code.
* :mod:`.align` — zero-padding head widths to multiples of 8 for fused-attention kernels.
* :mod:`.cli` — ``slimdiff-export``.

Engines are served by :mod:`slimdiff.runtime`.
"""

from .align import align_head_widths
from .modules import text_encoder_component, unet_component, vae_decoder_component
from .onnx import DEFAULT_OPSET, FALLBACK_OPSET, export_onnx, load_sidecar
from .shapes import Profile, Range, parse_profiles

__all__ = [
    "DEFAULT_OPSET", "FALLBACK_OPSET", "Profile", "Range", "align_head_widths", "export_onnx", "load_sidecar",
    "parse_profiles", "text_encoder_component", "unet_component", "vae_decoder_component",
]
