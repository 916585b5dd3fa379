"""Export dense and slim UNets (plus text encoder and VAE decoder) to ONNX, the input of engine builds.

* :mod:`.onnx` — opset-23 fused graphs (opset-18 fallback), dynamic shapes, sidecar JSON, parity check.
* :mod:`.align` — zero-padding head widths to multiples of 8 for fused-attention kernels.
* :mod:`.cli` — ``slimdiff-export``.

Engines are built by the backends of :mod:`slimdiff.engines` and served by :mod:`slimdiff.runtime`.
"""

from .align import align_head_widths
from .modules import text_encoder_component, unet_component, vae_decoder_component
from .onnx import DEFAULT_OPSET, FALLBACK_OPSET, export_onnx, load_sidecar
from .shapes import Profile, Range, parse_profiles

__all__ = [
    "DEFAULT_OPSET", "FALLBACK_OPSET", "Profile", "Range", "align_head_widths", "export_onnx", "load_sidecar",
    "parse_profiles", "text_encoder_component", "unet_component", "vae_decoder_component",
]
