"""The images some families are calibrated and measured on: ``--images`` folders (photographs to inpaint, control
maps, images to refine), read one per prompt in turn, and the measuring runs' stand-in image."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from ..errors import SlimDiffError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def calibration_images(folder: str | None, model: str, example: str = "a few hundred COCO photographs",
                       otherwise: str = "") -> list[Path]:
    """The image files of ``folder`` in name order; one line when there is no folder (saying why ``model`` needs
    one, with an ``example`` of such images and what the model takes ``otherwise``) or no image in it."""
    if folder is None:
        raise SlimDiffError(f"{model}: give a folder of images (`--images DIR`, e.g. {example}; any size, resized to "
                            f"the calibration size){otherwise}")
    path = Path(folder)
    if not path.is_dir():
        raise SlimDiffError(f"--images {folder!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SlimDiffError(f"--images {folder!r} holds no {', '.join(IMAGE_SUFFIXES)} images")
    for file in files:  # all of them now (headers and checksums, no decoding): not at prompt 300 of 500
        with _opened(file) as image:
            image.verify()
    return files


@contextmanager
def _opened(path: Path):
    """The image at ``path``, opened by PIL; one line for a file PIL cannot read, when opened or when read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            yield image
    except Exception as exc:  # PIL raises several types for a file that is not an image
        raise SlimDiffError(f"calibration image {str(path)!r} cannot be read: {exc}") from exc


@lru_cache(maxsize=1)
def colour_ramp():
    """A measuring run's stand-in image: a smooth 64×64 colour ramp — structure for the VAE to encode (and, as a
    control image, for a depth or edge model to follow), no file."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    pixels = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), 255 - np.tile(ramp, (64, 1))],
                      axis=-1)
    return Image.fromarray(pixels.round().astype(np.uint8))


def images_of_seeds(files: Sequence[Path], seeds: Sequence[int]) -> list:
    """The calibration images of a batch: seed ``s`` takes ``files[s mod count]``, so each prompt keeps its image
    whatever the batch size."""
    return [read_image(files[int(seed) % len(files)]) for seed in seeds]


def read_image(path: Path):
    with _opened(path) as image:
        return image.convert("RGB")
