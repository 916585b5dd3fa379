"""What every served-pipeline test checks of a live Triton repository: its images against the same pipeline in
this process and against diffusers' own pipeline around the same denoiser engine."""

from __future__ import annotations

import numpy as np

SIZE, STEPS = 16, 2
PROMPTS = [("a red circle above a blue square", 3), ("two green triangles", 11)]


def noise_image(seed: int, size: int = SIZE) -> np.ndarray:
    """An image a request carries (a starting or a conditioning image): seeded noise, HxWx3 uint8."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


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


def write_tiny_repository(pipe, root, *, image_to_image: bool = False, refiner=None):
    """What ``slimdiff-export --triton-repo`` (python mode) writes for ``pipe``, without its slimming (a rank plan
    does not change what is served), at SIZE px: ONNX Runtime engines of the denoiser at the rows one image takes
    (``root/unet`` or ``root/transformer``; with the ControlNet's residual or sample inputs, and the ControlNet's
    engine in ``root/controlnet``, for a ControlNet pipeline; the ``refiner``'s UNet in ``root/refiner`` when given),
    of the text encoders and the VAE at batch 1, and the repository ``root/repo`` serving them (image-to-image
    requests too when ``image_to_image``); returns the repository."""
    import torch

    from slimdiff.engines.build import build_controlnet_engine, build_denoiser_engine
    from slimdiff.engines.triton import build_serving_engines, check_pipeline, write_repository
    from slimdiff.export.modules import CONTROLNET
    from slimdiff.export.shapes import Range, latent_multiple, parse_profiles

    served = check_pipeline(pipe)
    family = served.family
    denoiser = family.denoiser(pipe)
    multiple = latent_multiple(denoiser.config)
    text_len = Range.parse(family.default_text_len(pipe), "text length").opt  # the one length the pipeline passes

    def build(batch, multiple=multiple) -> dict:
        return {"profiles": parse_profiles(str(batch), str(SIZE), str(SIZE), str(text_len),
                                           vae_scale=pipe.vae_scale_factor, multiple=multiple),
                "dtype": torch.float32, "device": "cpu", "multiple": multiple}

    rows = family.guided_rows_per_image(denoiser.config)
    (root / family.component).mkdir()
    # a ControlNet pipeline's denoiser takes the ControlNet's outputs: SD's residuals, FLUX's block samples
    controlnet_inputs = (family.controlnet_export_option(lambda: pipe.controlnet),) if served.controlnet else ()
    build_denoiser_engine(denoiser, "ort", root / family.component, **build(rows), export_options=controlnet_inputs,
                          family=family)
    folders = build_serving_engines(pipe, root, "ort", image_to_image=image_to_image, **build(1))
    if served.controlnet:
        folders[CONTROLNET] = root / CONTROLNET
        folders[CONTROLNET].mkdir()
        build_controlnet_engine(pipe.controlnet, "ort", folders[CONTROLNET], **build(rows))
    if refiner is not None:
        (root / "refiner").mkdir()
        build_denoiser_engine(refiner.unet, "ort", root / "refiner",
                              **build(rows, latent_multiple(refiner.unet.config)))
    write_repository(root / "repo", pipe, root / family.component, folders, "python", pipeline_instances=1,
                     image_to_image=image_to_image, refiner=refiner, refiner_folder=root / "refiner")
    return root / "repo"


def served_beside_diffusers(pipe, root):
    """:func:`write_tiny_repository` of ``pipe`` and two pipelines over its engines: the repository's own, run in
    this process, and diffusers' (``pipe``'s components, the denoiser engine). Returns (repository, the repository's
    pipeline, diffusers' pipeline)."""
    from slimdiff.families import family_for
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import local_runners, repository_pipeline

    repo = write_tiny_repository(pipe, root)
    in_process = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
    reference = type(pipe)(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    use_engine(reference, root / family_for(pipe).component)
    return repo, in_process, reference
