"""slimdiff: training-free slimming of Stable-Diffusion UNets, shipped as optimized inference engines.

The pipeline, one module per stage::

    slimset    (A) choose calibration prompts          calibrate (B) hooked sampling → float64 moments
    analyze    (C) TRQ, timestep weights, scores       decompose (D) closed-form FFN / QK / VO factors
    allocate   (E) ranks under one global budget       rebuild   (F) smaller Linears + attention processor
    export / runtime / bench                           ONNX, TensorRT, ORT, AOTInductor; serving; latency

Public names are imported lazily so ``import slimdiff`` stays cheap.
"""

__version__ = "0.1.0"

from .lazy import lazy_attributes

_EXPORTS = {
    "SlimConfig": "slim", "SlimReport": "slim", "slim_unet": "slim",
    "CalibrationConfig": "calibrate", "Statistics": "calibrate", "calibrate": "calibrate",
    "slim_pipeline": "api", "collect_statistics": "api", "choose_prompts": "api",
    "load_pipeline": "models", "load_unet": "models", "LoraSpec": "lora", "fuse_loras": "lora", "load_lora": "lora",
    "save_slim": "serialization", "load_slim": "serialization", "save_slim_pipeline": "serialization",
    "SlimUNet2DConditionModel": "slim_models", "SlimPixArtTransformer2DModel": "slim_models",
    "SlimSD3Transformer2DModel": "slim_models", "SlimFluxTransformer2DModel": "slim_models",
    "RankPlan": "plan", "SlimDiffError": "errors",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes(__name__, _EXPORTS)
