"""The project's own small text-to-image model for measuring quality in-house.

* :mod:`.shapes` — procedural captioned shape scenes (train / held-out composition splits);
* :mod:`.analyzer` — classical-vision reader of generated images, prompt-adherence scoring;
* :mod:`.train` — the SD-1.x-shaped pipeline trained from scratch (``python -m slimdiff.proxy.train``);
* :mod:`.evaluate` — ``adherence(pipe, prompts, seeds)``.

The trained weights live in ``slimdiff/assets/proxy`` (a diffusers ``StableDiffusionPipeline`` folder).
"""

from pathlib import Path

PROXY_DIR = Path(__file__).resolve().parent.parent / "assets" / "proxy"
