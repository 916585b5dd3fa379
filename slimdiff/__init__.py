"""slimdiff: training-free slimming of Stable-Diffusion UNets, shipped as optimized inference engines."""

__version__ = "0.1.0"
