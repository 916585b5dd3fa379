"""Serving engines built by ``slimdiff-export``.

``EngineUNet.from_folder(folder)`` loads the UNet engine of a folder (ONNX Runtime, AOTInductor or TensorRT),
``EnginePixArtTransformer.from_folder(folder)`` a PixArt transformer's, ``EngineSD3Transformer.from_folder(folder)`` an
SD3 transformer's, ``EngineFluxTransformer.from_folder(folder)`` a FLUX transformer's, ``EngineControlNet.from_folder``
a ControlNet's; ``use_engine(pipe, folder)`` puts the engine into a diffusers pipeline as ``pipe.unet`` /
``pipe.transformer`` / ``pipe.controlnet``; ``add_weights_version(repo, model, engine_folder, module)`` serves a
Triton repository's engine with another model's weights (another LoRA fused) as the model's next version.
"""

from .controlnet import EngineControlNet
from .denoiser import EngineDenoiser
from .flux import EngineFluxTransformer
from .pixart import EnginePixArtTransformer
from .sd3 import EngineSD3Transformer
from .served_weights import add_weights_version
from .unet import EngineUNet, use_engine

__all__ = ["EngineControlNet", "EngineDenoiser", "EngineFluxTransformer", "EnginePixArtTransformer",
           "EngineSD3Transformer", "EngineUNet", "add_weights_version", "use_engine"]
