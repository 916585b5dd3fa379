"""The Triton repository of a ControlNet pipeline: the prompt and the conditioning image in, the image out — the
ControlNet served as an engine beside the UNet engine that takes its residuals, the pipeline model running diffusers'
StableDiffusionControlNetPipeline (or StableDiffusionXLControlNetPipeline) over the repository's engines. Its images
are checked in this process against diffusers' own ControlNet pipeline around the same two engines, and a repository
written by ``slimdiff-export --controlnet DIR --triton-repo`` through the real ``tritonserver`` bundled in
nvidia-pytriton (python backend, CPU, loopback). Seeded tiny models, ONNX Runtime."""

import contextlib
import io
import json

import numpy as np
import pytest
from export_support import TWO_LEVEL_UNET, TWO_LEVEL_XL_UNET, seeded_controlnet, seeded_unet, write_slim_pipeline
from serving_support import SIZE, noise_image, write_tiny_repository

from slimdiff.errors import SlimDiffError
from slimdiff.models import build_builtin

pytest.importorskip("tritonclient.http")

STEPS = 2
PROMPT = "a red circle above a blue square"



_BUILT: dict = {}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def repository(request, tmp_path_factory):
    """``(root, pipe)``: ONNX Runtime engines of a tiny seeded SD (or SDXL) ControlNet pipeline — the UNet taking the
    ControlNet's residuals, the ControlNet, the text encoder(s) and the VAE decoder and encoder — and the python-mode
    repository ``root/repo`` written from them by the calls ``slimdiff-export --controlnet DIR --triton-repo
    --triton-img2img`` makes."""
    from slimdiff.engines.triton import controlnet_pipeline

    kind = request.param
    if kind in _BUILT:
        return _BUILT[kind]
    root = tmp_path_factory.mktemp(f"{kind}-controlnet-repo")
    base = build_builtin("builtin:tiny" if kind == "sd" else "builtin:tiny-xl")
    base.unet = seeded_unet(TWO_LEVEL_UNET if kind == "sd" else TWO_LEVEL_XL_UNET, seed=5)
    pipe = controlnet_pipeline(base, seeded_controlnet(base.unet))
    pipe.set_progress_bar_config(disable=True)
    write_tiny_repository(pipe, root, image_to_image=True)
    _BUILT[kind] = root, pipe
    return root, pipe


def test_the_repository_serves_the_controlnet_and_takes_the_conditioning_image(repository):
    from slimdiff.engines.triton import _pb, read_config

    root, pipe = repository
    repo = root / "repo"
    encoders = ["text_encoder", *(["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) else [])]
    assert sorted(p.name for p in repo.iterdir()) == ["controlnet", "pipeline", *encoders, "unet", "vae_decoder",
                                                      "vae_encoder"]
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == type(pipe).__name__ and spec["controlnet"] is True
    assert spec["image_inputs"] == ["control_image"] and spec["vae_encoder"] is True
    assert spec["image_to_image"] == type(pipe).__name__.replace("ControlNetPipeline", "ControlNetImg2ImgPipeline")
    pb, _ = _pb()
    config = read_config(repo / "pipeline" / "config.pbtxt")
    inputs = {t.name: (t.data_type, list(t.dims), t.optional) for t in config.input}
    assert inputs["control_image"] == (pb.TYPE_UINT8, [-1, -1, 3], False)
    assert inputs["controlnet_conditioning_scale"] == (pb.TYPE_FP32, [1], True)
    assert inputs["image"] == (pb.TYPE_UINT8, [-1, -1, 3], True)  # image-to-image requests: the starting image
    assert inputs["strength"] == (pb.TYPE_FP32, [1], True) and "mask_image" not in inputs
    # the ControlNet model returns what the UNet model takes beside the SD call, by name
    controlnet = read_config(repo / "controlnet" / "config.pbtxt")
    unet = read_config(repo / "unet" / "config.pbtxt")
    residuals = [t.name for t in unet.input if "additional_residual" in t.name]
    assert [t.name for t in controlnet.output] == residuals and len(residuals) > 2
    assert controlnet.input[-1].name == "folded_controlnet_cond"


def test_served_controlnet_pipeline_is_diffusers_pipeline_with_the_engines(repository):
    """The repository's pipeline (in this process, over the same engines) draws what diffusers' ControlNet pipeline
    with the UNet and ControlNet engines draws, within one grey level; the conditioning image and its scale reach
    the ControlNet."""
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    root, pipe = repository
    served = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    assert type(served) is type(pipe)
    reference = type(pipe)(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    use_engine(reference, root / "unet")
    use_engine(reference, root / "controlnet")
    options = dict(seed=3, steps=STEPS, height=SIZE, width=SIZE, control_image=noise_image(1))
    got = generate(served, PROMPT, **options)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 1
    assert np.abs(got.astype(int) - generate(reference, PROMPT, **options).astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served, PROMPT, **{**options, "control_image": noise_image(2)}))
    unconditioned = generate(served, PROMPT, **options, controlnet_conditioning_scale=0.0)
    assert not np.array_equal(got, unconditioned)
    with pytest.raises(SlimDiffError, match=r"request takes control_image, got none$"):
        generate(served, PROMPT, **{**options, "control_image": None})
    with pytest.raises(SlimDiffError, match=r"request takes no strength$"):
        generate(served, PROMPT, **options, strength=0.5)
    with pytest.raises(SlimDiffError, match=r"control_image must be a uint8 array of HxWx3 pixels"):
        generate(served, PROMPT, **{**options, "control_image": noise_image(1)[..., 0]})


def test_served_controlnet_image_to_image_is_diffusers_pipeline_with_the_engines(repository):
    """A request with a starting image runs the ControlNet image-to-image pipeline over the same engines: diffusers'
    image within one grey level; the starting image and the conditioning image both matter."""
    import diffusers

    from slimdiff.engines.triton import image_to_image_pipeline
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    root, pipe = repository
    served = image_to_image_pipeline(repository_pipeline(root / "repo" / "pipeline" / "1",
                                                         local_runners(root / "repo")))
    assert "ControlNetImg2Img" in type(served).__name__
    reference = type(pipe)(**pipe.components)
    use_engine(reference, root / "unet")
    use_engine(reference, root / "controlnet")
    # from_pipe drops a model component whose class is not the type hint: the engine's ControlNet goes by name
    reference = getattr(diffusers, type(served).__name__).from_pipe(reference, controlnet=reference.controlnet)
    reference.set_progress_bar_config(disable=True)
    options = dict(seed=3, steps=STEPS, image=noise_image(5), control_image=noise_image(1), strength=0.6)
    got = generate(served, PROMPT, **options)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 1
    assert np.abs(got.astype(int) - generate(reference, PROMPT, **options).astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served, PROMPT, **{**options, "image": noise_image(6)}))
    assert not np.array_equal(got, generate(served, PROMPT, **{**options, "control_image": noise_image(2)}))


def test_several_controlnets_are_refused_in_one_line(repository):
    from diffusers import MultiControlNetModel

    from slimdiff.engines.triton import check_pipeline

    _, pipe = repository
    several = type(pipe)(**{**pipe.components, "controlnet": MultiControlNetModel([pipe.controlnet] * 2)})
    with pytest.raises(SlimDiffError, match=r"so far, not Stable\w+ControlNetPipeline with several ControlNets$"):
        check_pipeline(several)


@pytest.mark.slow
def test_export_writes_a_controlnet_repository_tritonserver_serves(tmp_path):
    """``slimdiff-export --controlnet DIR --triton-repo --triton-img2img`` of a slim builtin:tiny (python mode): the
    bundled tritonserver serves the in-process repository pipeline's image bit for bit, which is diffusers' ControlNet
    pipeline's with the command's two engines within one grey level, and a ControlNet image-to-image request the
    in-process image-to-image pipeline's; a request without its conditioning image is answered with an error naming
    it."""
    import tritonclient.http as httpclient

    from slimdiff.cli import export as cli
    from slimdiff.engines.triton import controlnet_pipeline, image_to_image_pipeline, local_server, request_image
    from slimdiff.models import load_pipeline
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    pytest.importorskip("pytriton")
    controlnet = seeded_controlnet(load_pipeline("builtin:tiny").unet)
    controlnet.save_pretrained(tmp_path / "controlnet-model")
    out, repo = tmp_path / "engines", tmp_path / "repo"
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        rc = cli.main(["--model", str(write_slim_pipeline(tmp_path / "slim-pipeline")), "--engine", "ort", "--out",
                       str(out), "--controlnet", str(tmp_path / "controlnet-model"), "--triton-repo", str(repo),
                       "--triton-mode", "python", "--triton-img2img", "--batch", "2", "--height", "32",
                       "--width", "32", "--text-len", "77"])
    assert rc == 0, stderr.getvalue()
    assert sorted(p.name for p in repo.iterdir()) == ["controlnet", "pipeline", "text_encoder", "unet", "vae_decoder",
                                                      "vae_encoder"]
    control = noise_image(4)
    options = dict(seed=5, steps=STEPS, height=32, width=32)
    in_process = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
    expected = generate(in_process, PROMPT, **options, control_image=control, controlnet_conditioning_scale=0.8)
    reference = controlnet_pipeline(load_pipeline("builtin:tiny"), controlnet)
    reference.set_progress_bar_config(disable=True)
    use_engine(reference, out / "slim")
    use_engine(reference, out / "controlnet")
    drawn = generate(reference, PROMPT, **options, control_image=control, controlnet_conditioning_scale=0.8)
    assert np.abs(expected.astype(int) - drawn.astype(int)).max() <= 1 and expected.std() > 1
    start = noise_image(7, size=32)
    expected_img2img = generate(image_to_image_pipeline(in_process), PROMPT, seed=5, steps=STEPS, image=start,
                                control_image=control, strength=0.7)
    with local_server(repo, timeout_s=180, log=tmp_path / "server.log") as urls:
        client = httpclient.InferenceServerClient(urls["http"], network_timeout=120)
        served = request_image(client, PROMPT, 5, STEPS, height=32, width=32, control_image=control,
                               controlnet_conditioning_scale=0.8)
        assert np.array_equal(served, expected)
        assert np.array_equal(request_image(client, PROMPT, 5, STEPS, image=start, control_image=control,
                                            strength=0.7), expected_img2img)
        with pytest.raises(Exception, match="control_image"):
            request_image(client, PROMPT, 5, STEPS, height=32, width=32)
