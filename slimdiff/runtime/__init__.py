"""Serving engines built by ``slimdiff-export``.

``EngineUNet.from_folder(folder)`` loads the UNet engine of a folder (ONNX Runtime, AOTInductor or TensorRT),
``EnginePixArtTransformer.from_folder(folder)`` a PixArt transformer's; ``use_engine(pipe, folder)`` puts the
engine into a diffusers pipeline as ``pipe.unet`` / ``pipe.transformer``.
"""

from .denoiser import EngineDenoiser
from .pixart import EnginePixArtTransformer
from .unet import EngineUNet, use_engine

__all__ = ["EngineDenoiser", "EnginePixArtTransformer", "EngineUNet", "use_engine"]
