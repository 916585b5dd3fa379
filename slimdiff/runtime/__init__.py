"""Serving engines built by ``slimdiff-export``.

``EngineUNet.from_folder(folder)`` loads the UNet engine of a folder (ONNX Runtime, AOTInductor or
TensorRT); ``use_engine(pipe, folder)`` puts it into a diffusers pipeline as ``pipe.unet``.
"""

from .unet import EngineUNet, use_engine

__all__ = ["EngineUNet", "use_engine"]
