"""Image-to-image requests to a Triton repository (``--triton-img2img``): the pipeline model runs the family's
text-to-image pipeline for a prompt and its image-to-image pipeline (StableDiffusionImg2ImgPipeline,
StableDiffusionXLImg2ImgPipeline) for a prompt with an image, over the same engines plus a VAE encoder. Checked in
this process against diffusers' pipelines around the same UNet engine, and through the real ``tritonserver`` bundled
in nvidia-pytriton (python backend, CPU, loopback). Seeded tiny models, ONNX Runtime."""

import json

import numpy as np
import pytest
from export_support import TWO_LEVEL_UNET, TWO_LEVEL_XL_UNET, seeded_unet
from serving_support import SIZE, noise_image, write_tiny_repository

from slimdiff.errors import SlimDiffError
from slimdiff.models import build_builtin

pytest.importorskip("tritonclient.http")

STEPS = 3
PROMPT = "a red circle above a blue square"



_BUILT: dict = {}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def repository(request, tmp_path_factory):
    """``(root, pipe)``: ONNX Runtime engines of a tiny seeded SD (or SDXL) pipeline — UNet, text encoder(s), VAE
    decoder and encoder — and the python-mode repository ``root/repo`` serving image-to-image requests too, written
    by the calls ``slimdiff-export --triton-repo --triton-img2img`` makes."""
    kind = request.param
    if kind in _BUILT:
        return _BUILT[kind]
    root = tmp_path_factory.mktemp(f"{kind}-img2img-repo")
    pipe = build_builtin("builtin:tiny" if kind == "sd" else "builtin:tiny-xl")
    pipe.unet = seeded_unet(TWO_LEVEL_UNET if kind == "sd" else TWO_LEVEL_XL_UNET, seed=7)
    pipe.set_progress_bar_config(disable=True)
    write_tiny_repository(pipe, root, image_to_image=True)
    _BUILT[kind] = root, pipe
    return root, pipe


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def dit_repository(request, tmp_path_factory):
    """``(root, pipe)``: the same for builtin:tiny-sd3 (StableDiffusion3Img2ImgPipeline) and builtin:tiny-flux
    (FluxImg2ImgPipeline: packed latents, embedded guidance), their transformer engines at the rows one image takes."""
    root = tmp_path_factory.mktemp(f"{request.param}-img2img-repo")
    pipe = build_builtin(f"builtin:{request.param}")
    pipe.set_progress_bar_config(disable=True)
    write_tiny_repository(pipe, root, image_to_image=True)
    return root, pipe


def test_dit_image_to_image_is_diffusers_pipeline_with_the_engine(dit_repository):
    """SD3's and FLUX's image-to-image pipelines over the repository's engines draw diffusers' image-to-image image
    with the transformer engine within one grey level, at the image's size when the request names none."""
    import diffusers

    from slimdiff.engines.triton import image_to_image_pipeline
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    root, pipe = dit_repository
    repository = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    served = image_to_image_pipeline(repository)
    assert type(served).__name__ == {"StableDiffusion3Pipeline": "StableDiffusion3Img2ImgPipeline",
                                     "FluxPipeline": "FluxImg2ImgPipeline"}[type(pipe).__name__]
    reference = type(pipe)(**pipe.components)
    use_engine(reference, root / "transformer")
    reference = getattr(diffusers, type(served).__name__).from_pipe(reference)
    reference.set_progress_bar_config(disable=True)
    # a flow-matching img2img call starts at step int(steps · (1 − strength)): from pure noise at 3 steps and 0.7
    options = dict(seed=3, steps=STEPS, image=noise_image(1), strength=0.5)
    got = generate(served, PROMPT, **options)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 1
    assert np.abs(got.astype(int) - generate(reference, PROMPT, **options).astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served, PROMPT, **{**options, "image": noise_image(2)}))
    # an image off the VAE's grid draws at its size rounded down to it, as diffusers' image processor rounds
    assert generate(served, PROMPT, **{**options, "image": noise_image(1, size=SIZE + 1)}).shape == (SIZE, SIZE, 3)


def test_the_repository_takes_an_optional_image_and_serves_the_vae_encoder(repository):
    from slimdiff.engines.triton import _pb, read_config

    root, pipe = repository
    repo = root / "repo"
    assert "vae_encoder" in [p.name for p in repo.iterdir()]
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    img2img = "StableDiffusionImg2ImgPipeline" if type(pipe).__name__ == "StableDiffusionPipeline" else \
        "StableDiffusionXLImg2ImgPipeline"
    assert spec["pipeline_class"] == type(pipe).__name__ and spec["image_to_image"] == img2img
    assert spec["image_inputs"] == [] and spec["vae_encoder"] is True
    pb, _ = _pb()
    inputs = {t.name: (t.data_type, list(t.dims), t.optional)
              for t in read_config(repo / "pipeline" / "config.pbtxt").input}
    assert inputs["image"] == (pb.TYPE_UINT8, [-1, -1, 3], True)  # a text-to-image request leaves it out
    assert inputs["strength"] == (pb.TYPE_FP32, [1], True) and "mask_image" not in inputs


def test_served_image_to_image_is_diffusers_pipeline_with_the_engine(repository):
    """The repository's two pipelines (in this process, over the same engines) draw what diffusers' text-to-image and
    image-to-image pipelines with the UNet engine draw, within one grey level; the image and the strength matter."""
    import diffusers

    from slimdiff.engines.triton import image_to_image_pipeline
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    root, pipe = repository
    served = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    served_img2img = image_to_image_pipeline(served)
    reference = type(pipe)(**pipe.components)
    use_engine(reference, root / "unet")
    reference_img2img = getattr(diffusers, type(served_img2img).__name__).from_pipe(reference)
    for p in (reference, reference_img2img):
        p.set_progress_bar_config(disable=True)
    text = dict(seed=3, steps=STEPS, height=SIZE, width=SIZE)
    drawn = generate(served, PROMPT, **text)
    assert np.abs(drawn.astype(int) - generate(reference, PROMPT, **text).astype(int)).max() <= 1
    options = dict(seed=3, steps=STEPS, image=noise_image(1), strength=0.6)
    got = generate(served_img2img, PROMPT, **options)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 1
    assert np.abs(got.astype(int) - generate(reference_img2img, PROMPT, **options).astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served_img2img, PROMPT, **{**options, "image": noise_image(2)}))
    assert not np.array_equal(got, generate(served_img2img, PROMPT, **{**options, "strength": 0.9}))
    assert not np.array_equal(got, drawn)
    with pytest.raises(SlimDiffError, match=r"draws at its image's size \(16x16\): leave out height and width"):
        generate(served_img2img, PROMPT, **options, height=32, width=32)
    with pytest.raises(SlimDiffError, match=r"request takes no image, got image$"):
        generate(served, PROMPT, **options)


def test_image_to_image_is_refused_where_no_family_serves_it():
    from slimdiff.engines.triton import check_pipeline

    with pytest.raises(SlimDiffError, match=r"--triton-img2img serves FluxImg2ImgPipeline beside FluxPipeline, "
                                            r"StableDiffusion3Img2ImgPipeline beside StableDiffusion3Pipeline, "
                                            r"StableDiffusionControlNetImg2ImgPipeline beside "
                                            r"StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline beside "
                                            r"StableDiffusionPipeline, StableDiffusionXLControlNetImg2ImgPipeline "
                                            r"beside StableDiffusionXLControlNetPipeline, "
                                            r"StableDiffusionXLImg2ImgPipeline beside StableDiffusionXLPipeline so "
                                            r"far, not image-to-image requests beside PixArtSigmaPipeline$"):
        check_pipeline(build_builtin("builtin:tiny-pixart"), image_to_image=True)


def test_img2img_without_a_repository_is_refused_before_any_work(tmp_path, capsys):
    from slimdiff.cli import export as cli

    rc = cli.main(["--model", "builtin:tiny", "--engine", "ort", "--out", str(tmp_path / "out"), "--triton-img2img"])
    assert rc != 0 and "--triton-img2img is an option of the Triton repository" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("repository", ["sd"], indirect=True)
def test_tritonserver_serves_both_requests_from_the_repository(repository, tmp_path):
    """The bundled tritonserver answers a text-to-image and an image-to-image request to the repository with the
    in-process images, bit for bit. (``slimdiff-export --triton-img2img`` writes such a repository and the server
    serves it in tests/test_triton_controlnet.py, with a ControlNet.)"""
    import tritonclient.http as httpclient

    from slimdiff.engines.triton import image_to_image_pipeline, local_server, request_image
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    pytest.importorskip("pytriton")
    repo = repository[0] / "repo"
    in_process = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
    start = noise_image(4)
    expected_text = generate(in_process, PROMPT, seed=5, steps=STEPS, height=SIZE, width=SIZE)
    expected_image = generate(image_to_image_pipeline(in_process), PROMPT, seed=5, steps=STEPS, image=start,
                              strength=0.7)
    assert not np.array_equal(expected_text, expected_image)
    with local_server(repo, timeout_s=180, log=tmp_path / "server.log") as urls:
        client = httpclient.InferenceServerClient(urls["http"], network_timeout=120)
        assert np.array_equal(request_image(client, PROMPT, 5, STEPS, height=SIZE, width=SIZE), expected_text)
        assert np.array_equal(request_image(client, PROMPT, 5, STEPS, image=start, strength=0.7), expected_image)
