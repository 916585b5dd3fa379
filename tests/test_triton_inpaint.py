"""The Triton repository of an inpainting pipeline (SD inpainting: a 9-channel UNet): the prompt, the image and the
mask in, the image out — the VAE encoder served too (the masked image's latent), the pipeline model running diffusers'
StableDiffusionInpaintPipeline (or StableDiffusionXLInpaintPipeline) over the repository's engines. Its images are checked in this process against
diffusers' own pipeline around the same UNet engine, and through the real ``tritonserver`` bundled in nvidia-pytriton
(python backend, CPU, loopback)."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from export_support import TWO_LEVEL_UNET, TWO_LEVEL_XL_UNET, seeded_controlnet, seeded_unet
from serving_support import SIZE, noise_image, write_tiny_repository

from slimdiff.errors import SlimDiffError
from slimdiff.models import _seeded, build_builtin

pytest.importorskip("tritonclient.http")

STEPS = 2
PROMPT = "a red circle above a blue square"


def request_pixels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A request's image (seeded noise, HxWx3 uint8) and mask (255 on a centred square: where the pipeline paints)."""
    image = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    return image, mask


_BUILT: dict = {}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def repository(request, tmp_path_factory):
    return _repository(request.param, tmp_path_factory)


def _repository(kind: str, tmp_path_factory):
    """``(root, pipe)``: ONNX Runtime engines of a tiny seeded SD (or SDXL) inpainting pipeline (UNet, text
    encoder(s), VAE decoder and encoder) and the python-mode repository ``root/repo`` written from them by the calls
    ``slimdiff-export --triton-repo`` makes; built once per kind."""
    if kind in _BUILT:
        return _BUILT[kind]
    root = tmp_path_factory.mktemp(f"{kind}-inpaint-repo")
    base = build_builtin("builtin:tiny" if kind == "sd" else "builtin:tiny-xl")
    config, cls = ((TWO_LEVEL_UNET, StableDiffusionInpaintPipeline) if kind == "sd" else
                   (TWO_LEVEL_XL_UNET, StableDiffusionXLInpaintPipeline))
    unet = _seeded(5, lambda: UNet2DConditionModel(**dict(config, in_channels=9))).eval()
    pipe = cls(**{**base.components, "unet": unet.requires_grad_(False)})
    pipe.set_progress_bar_config(disable=True)
    write_tiny_repository(pipe, root)
    _BUILT[kind] = root, pipe
    return root, pipe


def test_the_repository_serves_the_vae_encoder_and_takes_the_image_and_mask(repository):
    from slimdiff.engines.triton import _pb, read_config

    root, pipe = repository
    repo = root / "repo"
    encoders = ["text_encoder"] if type(pipe) is StableDiffusionInpaintPipeline else ["text_encoder", "text_encoder_2"]
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", *encoders, "unet", "vae_decoder", "vae_encoder"]
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == type(pipe).__name__
    assert spec["image_inputs"] == ["image", "mask_image"]
    pb, _ = _pb()
    config = read_config(repo / "pipeline" / "config.pbtxt")
    inputs = {t.name: (t.data_type, list(t.dims), t.optional) for t in config.input}
    assert inputs["image"] == (pb.TYPE_UINT8, [-1, -1, 3], False)
    assert inputs["mask_image"] == (pb.TYPE_UINT8, [-1, -1], False)
    assert inputs["strength"] == (pb.TYPE_FP32, [1], True)
    # the encoder takes the image folded onto the latent grid and returns the posterior's mean and log-variance
    latent, scale = SIZE // pipe.vae_scale_factor, pipe.vae_scale_factor
    encoder = read_config(repo / "vae_encoder" / "config.pbtxt")
    assert [(t.name, list(t.dims)) for t in encoder.input] == [("folded_image", [3 * scale * scale, latent, latent])]
    assert [(t.name, list(t.dims)) for t in encoder.output] == [
        ("latent_parameters", [2 * pipe.vae.config.latent_channels, latent, latent])]


def test_the_served_vae_encoder_is_the_vaes(repository):
    from slimdiff.runtime.triton_models import local_runners, repository_pipeline

    root, pipe = repository
    served = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = pipe.vae.encode(image).latent_dist
    got = served.vae.encode(image).latent_dist
    torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.std, expected.std, rtol=0, atol=1e-5)


def test_served_inpainting_is_diffusers_pipeline_with_the_engine(repository):
    """The repository's pipeline (in this process, over the same engines) paints what diffusers' inpainting pipeline
    with the UNet engine paints, within one grey level; the mask decides where: another mask, another image."""
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    root, pipe = repository
    served = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    reference = type(pipe)(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    use_engine(reference, root / "unet")
    image, mask = request_pixels(1)
    options = dict(seed=3, steps=STEPS, height=SIZE, width=SIZE, image=image, mask_image=mask)
    got = generate(served, PROMPT, **options)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 1
    assert np.abs(got.astype(int) - generate(reference, PROMPT, **options).astype(int)).max() <= 1
    mask[:, :] = 255
    assert not np.array_equal(got, generate(served, PROMPT, **{**options, "mask_image": mask}))
    with pytest.raises(SlimDiffError, match=r"request takes image and mask_image, got image$"):
        generate(served, PROMPT, **{**options, "mask_image": None})
    with pytest.raises(SlimDiffError, match=r"mask_image must be a uint8 array of HxW pixels"):
        generate(served, PROMPT, **{**options, "mask_image": mask[:8]})


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def controlnet_repository(request, tmp_path_factory):
    """``(root, pipe)``: a tiny seeded SD (or SDXL) ControlNet inpainting pipeline — the 9-channel UNet taking the
    residuals of a ControlNet made from a text-to-image UNet of its architecture (an inpainting ControlNet reads the
    latent alone, as control_v11p_sd15_inpaint does) — its engines, and the python-mode repository written by the
    calls ``slimdiff-export --controlnet DIR --triton-repo`` makes."""
    from slimdiff.engines.triton import controlnet_pipeline

    kind = request.param
    root = tmp_path_factory.mktemp(f"{kind}-controlnet-inpaint-repo")
    base = build_builtin("builtin:tiny" if kind == "sd" else "builtin:tiny-xl")
    config, cls = ((TWO_LEVEL_UNET, StableDiffusionInpaintPipeline) if kind == "sd" else
                   (TWO_LEVEL_XL_UNET, StableDiffusionXLInpaintPipeline))
    unet = _seeded(5, lambda: UNet2DConditionModel(**dict(config, in_channels=9))).eval().requires_grad_(False)
    pipe = controlnet_pipeline(cls(**{**base.components, "unet": unet}), seeded_controlnet(seeded_unet(config, 6)))
    pipe.set_progress_bar_config(disable=True)
    write_tiny_repository(pipe, root)
    return root, pipe


def test_served_controlnet_inpainting_is_diffusers_pipeline_with_the_engines(controlnet_repository):
    """The repository's ControlNet inpainting pipeline (in this process, over the same engines) paints what diffusers'
    StableDiffusion(XL)ControlNetInpaintPipeline with the UNet and ControlNet engines paints, within one grey level;
    the mask and the conditioning image both matter, and a request carries all three images."""
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    root, pipe = controlnet_repository
    assert type(pipe).__name__ in ("StableDiffusionControlNetInpaintPipeline",
                                   "StableDiffusionXLControlNetInpaintPipeline")
    spec = json.loads((root / "repo" / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == type(pipe).__name__ and spec["controlnet"] is True
    assert spec["image_inputs"] == ["image", "mask_image", "control_image"] and spec["vae_encoder"] is True
    served = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    reference = type(pipe)(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    use_engine(reference, root / "unet")
    use_engine(reference, root / "controlnet")
    image, mask = request_pixels(1)
    options = dict(seed=3, steps=STEPS, height=SIZE, width=SIZE, image=image, mask_image=mask,
                   control_image=noise_image(2))
    got = generate(served, PROMPT, **options)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 1
    assert np.abs(got.astype(int) - generate(reference, PROMPT, **options).astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served, PROMPT, **{**options, "control_image": noise_image(4)}))
    assert not np.array_equal(got, generate(served, PROMPT, **{**options, "mask_image": np.full_like(mask, 255)}))
    with pytest.raises(SlimDiffError, match=r"request takes image and mask_image and control_image, got image and "
                                            r"mask_image$"):
        generate(served, PROMPT, **{**options, "control_image": None})


@pytest.mark.slow
def test_tritonserver_serves_inpainting(tmp_path_factory, tmp_path):
    """One request to the real tritonserver (SD's repository: the transport is the same for SDXL's, which runs in
    this process above): the served image is the in-process repository pipeline's, bit for bit; a request without
    its mask is answered with an error naming it."""
    import tritonclient.http as httpclient

    from slimdiff.engines.triton import local_server, request_image
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    root, _ = _repository("sd", tmp_path_factory)
    repo = root / "repo"
    image, mask = request_pixels(2)
    in_process = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
    expected = generate(in_process, PROMPT, seed=4, steps=STEPS, height=SIZE, width=SIZE, image=image,
                        mask_image=mask, strength=0.9)
    with local_server(repo, timeout_s=180, log=tmp_path / "server.log") as urls:
        client = httpclient.InferenceServerClient(urls["http"])
        served = request_image(client, PROMPT, 4, STEPS, height=SIZE, width=SIZE, image=image, mask_image=mask,
                               strength=0.9)
        assert np.array_equal(served, expected)
        with pytest.raises(Exception, match="mask_image"):
            request_image(client, PROMPT, 4, STEPS, height=SIZE, width=SIZE, image=image)
