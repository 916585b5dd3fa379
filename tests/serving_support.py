"""What every served-pipeline test checks of a live Triton repository: its images against the same pipeline in
this process and against diffusers' own pipeline around the same denoiser engine."""

from __future__ import annotations

import numpy as np

SIZE, STEPS = 16, 2
PROMPTS = [("a red circle above a blue square", 3), ("two green triangles", 11)]


def served_images_match(client, repo, pipe) -> list[np.ndarray]:
    """Request PROMPTS from the served ``pipeline`` model of ``repo``; each image must equal the repository's
    pipeline run in this process over the same engines, and ``pipe`` (diffusers' pipeline, its denoiser already the
    engine: PyTorch text encoders and VAE) within one grey level. Returns the served images."""
    from slimdiff.engines.triton import request_image
    from slimdiff.runtime.triton_models import (
        generate,
        local_runners,
        repository_pipeline,
    )

    in_process = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt, seed in PROMPTS:
        served = request_image(client, prompt, seed, STEPS, height=SIZE, width=SIZE)
        assert served.shape == (SIZE, SIZE, 3) and served.dtype == np.uint8
        # Same engines, same diffusers loop, run in this process: the very same image.
        assert np.array_equal(served, generate(in_process, prompt, seed=seed, steps=STEPS, height=SIZE, width=SIZE))
        # The diffusers pipeline with its PyTorch text encoders and VAE: equal up to float rounding.
        reference = generate(pipe, prompt, seed=seed, steps=STEPS, height=SIZE, width=SIZE)
        assert np.abs(served.astype(int) - reference.astype(int)).max() <= 1
        assert served.std() > 1  # an image with content, not a flat fill
        images.append(served)
    assert not np.array_equal(*images)
    return images
