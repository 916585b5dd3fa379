"""The Triton model repository of an SDXL pipeline (builtin:tiny-xl): both text encoders, the UNet with its added
conditions and the VAE decoder as engine models, and the ``pipeline`` model running ``StableDiffusionXLPipeline``
through BLS — configurations read back through Triton's own protobuf schema, and the repository served by the real
``tritonserver`` bundled in nvidia-pytriton (python backend, CPU, loopback, free ports)."""

import json

import numpy as np
import pytest
import torch
from serving_support import PROMPTS, SIZE, served_images_match, write_tiny_repository

from slimdiff.errors import SlimDiffError

pytest.importorskip("tritonclient.grpc")

# The smallest engines that run the loop: latent 8² (16 px at tiny-xl's VAE scale 2), 77 tokens, one image — the
# UNet at batch 2 (guidance), the text encoders and the VAE decoder at 1 — and two steps.


@pytest.fixture(scope="module")
def xl_repository(tmp_path_factory):
    """``(root, pipe)``: builtin:tiny-xl with a two-level UNet (export time grows with the graph), ONNX Runtime
    engines of its UNet (``root/unet``), text encoders and VAE decoder, and the python-mode repository ``root/repo``
    written from them by the calls ``slimdiff-export --triton-repo`` makes (without its slimming: a rank plan does
    not change what is served)."""
    from export_support import TWO_LEVEL_XL_UNET, seeded_unet

    from slimdiff.models import build_builtin

    root = tmp_path_factory.mktemp("triton_xl")
    pipe = build_builtin("builtin:tiny-xl")
    pipe.unet = seeded_unet(TWO_LEVEL_XL_UNET)
    write_tiny_repository(pipe, root)
    return root, pipe


def _config(repo, name):
    from slimdiff.engines.triton import read_config

    return read_config(repo / name / "config.pbtxt")


def _tensors(tensors):
    return {t.name: (t.data_type, list(t.dims)) for t in tensors}


def test_xl_repository_models_are_named_typed_and_shaped_from_the_engines(xl_repository):
    from slimdiff.engines.triton import _pb

    root, pipe = xl_repository
    repo = root / "repo"
    pb, _ = _pb()
    fp32, int64 = pb.TYPE_FP32, pb.TYPE_INT64
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder", "text_encoder_2", "unet",
                                                      "vae_decoder"]
    width_1, width_2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    pooled = pipe.text_encoder_2.config.projection_dim
    # The batch axis is max_batch_size (the engine's largest batch), left out of the dims.
    text_1, text_2 = _config(repo, "text_encoder"), _config(repo, "text_encoder_2")
    assert text_1.max_batch_size == 1 and text_2.max_batch_size == 1
    assert _tensors(text_1.input) == {"input_ids": (int64, [77])}
    assert _tensors(text_1.output) == {"penultimate_hidden_state": (fp32, [77, width_1])}
    # The second encoder: its penultimate hidden state (the prompt embedding's second half) and the pooled,
    # projected text_embeds the UNet's added conditioning reads.
    assert [t.name for t in text_2.output] == ["penultimate_hidden_state", "text_embeds"]
    assert _tensors(text_2.output) == {"penultimate_hidden_state": (fp32, [77, width_2]),
                                       "text_embeds": (fp32, [pooled])}
    unet = _config(repo, "unet")
    assert unet.max_batch_size == 2
    assert [t.name for t in unet.input] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    latent = SIZE // pipe.vae_scale_factor
    assert _tensors(unet.input) == {"sample": (fp32, [4, latent, latent]), "timestep": (fp32, [1]),
                                    "encoder_hidden_states": (fp32, [77, width_1 + width_2]),
                                    "text_embeds": (fp32, [pooled]), "time_ids": (fp32, [6])}
    assert _tensors(unet.output) == {"out_sample": (fp32, [4, latent, latent])}
    vae = _config(repo, "vae_decoder")
    assert _tensors(vae.input) == {"latent_sample": (fp32, [4, latent, latent])}
    assert _tensors(vae.output) == {"sample": (fp32, [3, SIZE, SIZE])}
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == "StableDiffusionXLPipeline" and spec["denoiser"] == "unet"
    assert [(t["name"], t["tokenizer"]) for t in spec["text_encoders"]] == [("text_encoder", "tokenizer"),
                                                                            ("text_encoder_2", "tokenizer_2")]
    assert spec["options"] == {"force_zeros_for_empty_prompt": True, "add_watermarker": False}


def test_xl_text_encoder_engine_gives_the_pipelines_embeddings(xl_repository):
    """The served text encoders' outputs are what StableDiffusionXLPipeline.encode_prompt computes in PyTorch."""
    from slimdiff.runtime.triton_models import local_runners, repository_pipeline

    root, pipe = xl_repository
    served = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    assert type(served).__name__ == "StableDiffusionXLPipeline"
    with torch.no_grad():
        expected = pipe.encode_prompt(PROMPTS[0][0], device="cpu", do_classifier_free_guidance=False)
        got = served.encode_prompt(PROMPTS[0][0], device="cpu", do_classifier_free_guidance=False)
    embeds, pooled = expected[0], expected[2]
    assert got[0].shape == embeds.shape and got[2].shape == pooled.shape
    torch.testing.assert_close(got[0], embeds, rtol=0, atol=1e-4)
    torch.testing.assert_close(got[2], pooled, rtol=0, atol=1e-4)
    with pytest.raises(SlimDiffError, match=r"hidden_states\[-2\] only \(no clip_skip\)"):
        served.encode_prompt(PROMPTS[0][0], device="cpu", do_classifier_free_guidance=False, clip_skip=1)


def test_unserved_engines_are_refused_before_work():
    from slimdiff.engines.triton import check_pipeline
    from slimdiff.models import build_builtin

    # slimdiff's own TensorRT runner binds one output: SDXL's second text encoder has two
    with pytest.raises(SlimDiffError, match="text_encoder_2 returns several outputs.*--triton-mode native"):
        check_pipeline(build_builtin("builtin:tiny-xl"), "trt", "python")


# ---------------------------------------------------------------------------------------------------------
# A real tritonserver
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_xl(xl_repository, tmp_path_factory):
    pytest.importorskip("pytriton")
    from slimdiff.engines.triton import local_server

    root, pipe = xl_repository
    log = tmp_path_factory.mktemp("triton_xl_log") / "tritonserver.log"
    with local_server(root / "repo", timeout_s=180, log=log) as urls:
        yield root, pipe, urls


@pytest.mark.slow
def test_served_xl_pipeline_gives_the_in_process_image(served_xl):
    import tritonclient.http as httpclient

    from slimdiff.runtime import use_engine

    root, pipe, urls = served_xl
    client = httpclient.InferenceServerClient(urls["http"], network_timeout=120)
    use_engine(pipe, root / "unet")  # diffusers' own SDXL pipeline: PyTorch text encoders and VAE, the UNet engine
    served_images_match(client, root / "repo", pipe)
    # The second encoder's two outputs over HTTP, as the pipeline model reads them through BLS.
    ids = pipe.tokenizer_2(PROMPTS[0][0], padding="max_length", max_length=77, return_tensors="np").input_ids
    tensor = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids.astype(np.int64))
    result = client.infer("text_encoder_2", [tensor])
    with torch.no_grad():
        expected = pipe.text_encoder_2(torch.from_numpy(ids).long(), output_hidden_states=True)
    np.testing.assert_allclose(result.as_numpy("text_embeds"), expected.text_embeds.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.as_numpy("penultimate_hidden_state"), expected.hidden_states[-2].numpy(),
                               atol=1e-4, rtol=0)


def test_sdxl_vae_engines_stay_float32_beside_float16_engines_as_the_pipeline_upcasts(tmp_path, monkeypatch):
    """SDXL's pipelines run a VAE whose config sets force_upcast in float32 (its float16 activations overflow):
    its served engines are built in float32 beside float16 text encoders; the fp16-fix VAE (flag cleared) and SD's
    VAE, which SD's pipeline never upcasts, are built in float16."""
    from slimdiff.engines import build as engine_build
    from slimdiff.engines.triton import build_serving_engines
    from slimdiff.export.shapes import parse_profiles
    from slimdiff.models import build_builtin

    built = {}
    monkeypatch.setattr(engine_build, "build_component_engine",
                        lambda component, kind, folder, **options: built.__setitem__(component.name, options["dtype"]))
    for model, force_upcast, vae_dtype in (("builtin:tiny-xl", True, torch.float32),
                                           ("builtin:tiny-xl", False, torch.float16),
                                           ("builtin:tiny", True, torch.float16)):
        pipe = build_builtin(model)
        pipe.vae.register_to_config(force_upcast=force_upcast)
        built.clear()
        out = tmp_path / f"{model[8:]}-{force_upcast}"
        out.mkdir()
        build_serving_engines(pipe, out, "ort", image_to_image=True, dtype=torch.float16, device="cpu", multiple=2,
                              profiles=parse_profiles("1", "16", "16", "77", vae_scale=2, multiple=2))
        assert built.pop("vae_decoder") == built.pop("vae_encoder") == vae_dtype, (model, force_upcast)
        assert set(built.values()) == {torch.float16} and "text_encoder" in built
