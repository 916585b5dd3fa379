"""The Triton model repositories of the DiT pipelines: PixArt-Σ (builtin:tiny-pixart: one T5 text encoder taking the
tokenizer's padding mask), SD3 (builtin:tiny-sd3: two CLIP encoders with pooled outputs and a T5) and FLUX
(builtin:tiny-flux: CLIP-L's pooled output and a T5; the transformer engine takes the unpacked latent and the embedded
guidance), each with its transformer engine and VAE decoder and the ``pipeline`` model running the diffusers pipeline
through BLS — configurations read back through Triton's own protobuf schema, encoders checked against what the
pipeline computes in PyTorch, each repository's pipeline loop run in this process against diffusers' own pipeline,
and FLUX's repository served by the real ``tritonserver`` bundled in nvidia-pytriton (python backend, CPU, loopback,
free ports). Unserved pipelines are refused in one line."""

import json
import re

import numpy as np
import pytest
import torch
from serving_support import PROMPTS, SIZE, STEPS, served_images_match, write_tiny_repository

from slimdiff.errors import SlimDiffError

pytest.importorskip("tritonclient.grpc")

# The smallest engines that run the loop: latent 8² (16 px at the tiny VAEs' scale 2), the transformer at the rows
# one image takes (2 with classifier-free guidance; FLUX's embedded guidance: 1), the text encoders and the VAE
# decoder at 1; two steps.
# diffusers' default max_sequence_length of each pipeline's call: the T5 prompt length the served pipeline pads to
T5_TOKENS = {"tiny-pixart": 300, "tiny-sd3": 256, "tiny-flux": 512}


@pytest.fixture(scope="module", params=["tiny-pixart", "tiny-sd3", "tiny-flux"])
def dit_repository(request, tmp_path_factory):
    """``(name, root, pipe)``: ONNX Runtime engines of builtin:<name>'s transformer (``root/transformer``), text
    encoders and VAE decoder, and the python-mode repository ``root/repo`` written from them by the calls
    ``slimdiff-export --triton-repo`` makes (without its slimming: a rank plan does not change what is served)."""
    from slimdiff.models import build_builtin

    name = request.param
    root = tmp_path_factory.mktemp(name)
    pipe = build_builtin(f"builtin:{name}")
    write_tiny_repository(pipe, root)  # the family's one text length: PixArt-Σ 300 tokens, SD3 77 + 256
    return name, root, pipe


def _tensors(repo, model, side):
    from slimdiff.engines.triton import read_config

    config = read_config(repo / model / "config.pbtxt")
    return {t.name: (t.data_type, list(t.dims)) for t in getattr(config, side)}


def test_repository_models_take_and_return_what_the_pipeline_reads(dit_repository):
    from slimdiff.engines.triton import _pb

    name, root, pipe = dit_repository
    repo = root / "repo"
    pb, _ = _pb()
    fp32, int64 = pb.TYPE_FP32, pb.TYPE_INT64
    t5_tokens, latent = T5_TOKENS[name], SIZE // pipe.vae_scale_factor
    config = pipe.transformer.config
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["denoiser"] == "transformer"
    out_channels = config.out_channels
    if name == "tiny-pixart":
        assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder", "transformer", "vae_decoder"]
        assert spec["pipeline_class"] == "PixArtSigmaPipeline" and spec["options"] == {}
        # encode_prompt passes the tokenizer's attention mask to the T5 and reads its last hidden state
        assert _tensors(repo, "text_encoder", "input") == {"input_ids": (int64, [t5_tokens]),
                                                           "attention_mask": (int64, [t5_tokens])}
        assert _tensors(repo, "text_encoder", "output") == {
            "last_hidden_state": (fp32, [t5_tokens, pipe.text_encoder.config.d_model])}
        # the transformer takes the same mask (encoder_attention_mask) beside the T5 states
        assert _tensors(repo, "transformer", "input") == {
            "hidden_states": (fp32, [config.in_channels, latent, latent]), "timestep": (fp32, [1]),
            "encoder_hidden_states": (fp32, [t5_tokens, config.caption_channels]),
            "encoder_attention_mask": (fp32, [t5_tokens])}
    elif name == "tiny-flux":
        assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder", "text_encoder_2", "transformer",
                                                          "vae_decoder"]
        assert spec["pipeline_class"] == "FluxPipeline" and spec["options"] == {}
        clip_tokens = pipe.tokenizer_max_length
        # CLIP-L: its pooler_output alone (the pooled projections); the T5: [0] over max_sequence_length tokens
        assert _tensors(repo, "text_encoder", "input") == {"input_ids": (int64, [clip_tokens])}
        assert _tensors(repo, "text_encoder", "output") == {
            "pooler_output": (fp32, [pipe.text_encoder.config.hidden_size])}
        assert _tensors(repo, "text_encoder_2", "input") == {"input_ids": (int64, [t5_tokens])}
        assert _tensors(repo, "text_encoder_2", "output") == {
            "last_hidden_state": (fp32, [t5_tokens, pipe.text_encoder_2.config.d_model])}
        # the unpacked latent (the engine packs it and builds the positions itself) and the embedded guidance
        channels = config.in_channels // 4
        assert _tensors(repo, "transformer", "input") == {
            "hidden_states": (fp32, [channels, latent, latent]), "timestep": (fp32, [1]),
            "encoder_hidden_states": (fp32, [t5_tokens, config.joint_attention_dim]),
            "pooled_projections": (fp32, [config.pooled_projection_dim]), "guidance": (fp32, [1])}
        out_channels = channels
    else:
        assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder", "text_encoder_2",
                                                          "text_encoder_3", "transformer", "vae_decoder"]
        assert spec["pipeline_class"] == "StableDiffusion3Pipeline" and spec["options"] == {}
        clip_tokens = pipe.tokenizer_max_length
        for encoder in ("text_encoder", "text_encoder_2"):  # hidden_states[-2], and [0]: the pooled projection
            width = getattr(pipe, encoder).config.hidden_size
            pooled = getattr(pipe, encoder).config.projection_dim
            assert _tensors(repo, encoder, "input") == {"input_ids": (int64, [clip_tokens])}
            assert _tensors(repo, encoder, "output") == {"penultimate_hidden_state": (fp32, [clip_tokens, width]),
                                                         "text_embeds": (fp32, [pooled])}
        # the T5: [0] over max_sequence_length tokens, no mask
        assert _tensors(repo, "text_encoder_3", "input") == {"input_ids": (int64, [t5_tokens])}
        assert _tensors(repo, "text_encoder_3", "output") == {
            "last_hidden_state": (fp32, [t5_tokens, pipe.text_encoder_3.config.d_model])}
        assert _tensors(repo, "transformer", "input") == {
            "hidden_states": (fp32, [config.in_channels, latent, latent]), "timestep": (fp32, [1]),
            "encoder_hidden_states": (fp32, [clip_tokens + t5_tokens, config.joint_attention_dim]),
            "pooled_projections": (fp32, [config.pooled_projection_dim])}
    assert _tensors(repo, "transformer", "output") == {"out_sample": (fp32, [out_channels, latent, latent])}
    # the VAE decoder decodes; the pipelines scale (and SD3's and FLUX's shift) the latents themselves, from the VAE
    # config
    channels = pipe.vae.config.latent_channels
    assert _tensors(repo, "vae_decoder", "input") == {"latent_sample": (fp32, [channels, latent, latent])}
    assert _tensors(repo, "vae_decoder", "output") == {"sample": (fp32, [3, SIZE, SIZE])}
    vae_config = json.loads((repo / "pipeline" / "1" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pipe.vae.config.scaling_factor
    assert vae_config["shift_factor"] == pipe.vae.config.shift_factor


def test_served_text_encoders_give_the_pipelines_embeddings(dit_repository):
    """encode_prompt through the repository's encoder engines is what the pipeline computes in PyTorch — PixArt's
    padding mask included (a T5 that ignored it would let the prompt's tokens attend to the padding)."""
    from slimdiff.runtime.triton_models import local_runners, repository_pipeline

    name, root, pipe = dit_repository
    served = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    prompt = PROMPTS[0][0]
    with torch.no_grad():
        if name == "tiny-pixart":
            options = {"do_classifier_free_guidance": True, "device": "cpu", "clean_caption": False}
            expected, got = pipe.encode_prompt(prompt, **options), served.encode_prompt(prompt, **options)
            embeds, mask = expected[0], expected[1]
            assert 0 < mask.sum() < mask.numel()  # the prompt is padded: the mask matters
            torch.testing.assert_close(got[1], mask, rtol=0, atol=0)
            torch.testing.assert_close(got[2], expected[2], rtol=0, atol=1e-4)  # the negative prompt's
        elif name == "tiny-flux":
            options = {"prompt_2": None, "device": "cpu"}
            expected, got = pipe.encode_prompt(prompt, **options), served.encode_prompt(prompt, **options)
            embeds = expected[0]
            torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-4)  # CLIP-L's pooled output
            torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)  # the text positions (zeros)
        else:
            options = {"prompt_2": None, "prompt_3": None, "device": "cpu", "do_classifier_free_guidance": False}
            expected, got = pipe.encode_prompt(prompt, **options), served.encode_prompt(prompt, **options)
            embeds = expected[0]
            torch.testing.assert_close(got[2], expected[2], rtol=0, atol=1e-4)  # the pooled projections
    assert got[0].shape == embeds.shape
    torch.testing.assert_close(got[0], embeds, rtol=0, atol=1e-4)


def _own_lines(err: str) -> list[str]:
    """The command's stderr lines, less transformers' import-time notes (printed once per process, by whichever test
    imports its image processors first)."""
    return [line for line in err.strip().splitlines() if not line.startswith("[transformers]")]


def test_unserved_pipelines_and_engines_are_refused_in_one_line(tmp_path, capsys):
    from diffusers import PixArtAlphaPipeline

    from slimdiff.cli import export as cli
    from slimdiff.engines.triton import check_pipeline, served_pipelines
    from slimdiff.models import build_builtin

    # PixArt-α's pipeline (its own class: 120 tokens, aspect-ratio conditions) is not served
    alpha = PixArtAlphaPipeline(**build_builtin("builtin:tiny-pixart").components)
    served = served_pipelines()
    assert {"PixArtSigmaPipeline", "StableDiffusion3Pipeline", "FluxPipeline"} <= set(served)
    assert "PixArtAlphaPipeline" not in served
    with pytest.raises(SlimDiffError, match=rf"--triton-repo serves {re.escape(', '.join(served))} so far, not "
                                            r"PixArtAlphaPipeline$"):
        check_pipeline(alpha)
    # engines that cannot take the served pipeline's text length: refused before any work
    out, repo = tmp_path / "engines", tmp_path / "repo"
    for model, tokens, served in (("tiny-pixart", 300, "PixArtSigmaPipeline"), ("tiny-flux", 512, "FluxPipeline")):
        rc = cli.main(["--model", f"builtin:{model}", "--engine", "ort", "--out", str(out), "--triton-repo",
                       str(repo), "--triton-mode", "python", "--text-len", "77"])
        err = _own_lines(capsys.readouterr().err)
        assert rc != 0 and len(err) == 1 and f"leaves out the {tokens} text tokens the served {served}" in err[0]
        assert not out.exists() and not repo.exists()
    # slimdiff's own TensorRT runner binds one output: SD3's CLIP encoders have two
    with pytest.raises(SlimDiffError, match=r"text_encoder, text_encoder_2 returns several outputs.*--triton-mode "
                                            "native"):
        check_pipeline(build_builtin("builtin:tiny-sd3"), "trt", "python")


# ---------------------------------------------------------------------------------------------------------
# A real tritonserver
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_dit(dit_repository, tmp_path_factory):
    pytest.importorskip("pytriton")
    from slimdiff.engines.triton import local_server

    name, root, pipe = dit_repository
    log = tmp_path_factory.mktemp(f"triton_{name}_log") / "tritonserver.log"
    with local_server(root / "repo", timeout_s=240, log=log) as urls:
        yield name, root, pipe, urls


def test_repository_pipeline_gives_the_image_of_diffusers_pipeline_around_the_engine(dit_repository):
    """The repository's ``pipeline`` model's loop, run in this process over the repository's engines, draws diffusers'
    own image (PyTorch encoders and VAE around the transformer engine) within one grey level, with and without a
    negative prompt. The Triton transport around that loop is the same for every family: a live server is tested
    with FLUX below (and SD, SDXL in tests/test_triton*.py), which saves two server starts (~40 s each) of CI time."""
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    name, root, pipe = dit_repository
    in_process = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    use_engine(pipe, root / "transformer")
    pipe.set_progress_bar_config(disable=True)
    images = []
    for (prompt, seed), negative in zip(PROMPTS, (None, "blurry")):
        options = dict(seed=seed, steps=STEPS, height=SIZE, width=SIZE, negative_prompt=negative)
        image, reference = generate(in_process, prompt, **options), generate(pipe, prompt, **options)
        assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1 and image.std() > 1
        images.append(image)
    assert not np.array_equal(*images)


@pytest.mark.slow
@pytest.mark.parametrize("dit_repository", ["tiny-flux"], indirect=True)
def test_served_pipeline_gives_the_in_process_image(served_dit):
    import tritonclient.http as httpclient

    from slimdiff.engines.triton import request_image
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate

    name, root, pipe, urls = served_dit
    client = httpclient.InferenceServerClient(urls["http"], network_timeout=120)
    use_engine(pipe, root / "transformer")  # diffusers' own pipeline: PyTorch text encoders and VAE, the engine
    images = served_images_match(client, root / "repo", pipe)
    # A negative prompt reaches the served encoders too (PixArt: its own padding mask); FluxPipeline reads one only
    # with a true_cfg_scale above 1, which a request does not set: the same image.
    prompt, seed = PROMPTS[0]
    negative = request_image(client, prompt, seed, STEPS, height=SIZE, width=SIZE, negative_prompt="blurry")
    assert np.array_equal(negative, images[0]) == (name == "tiny-flux")
    reference = generate(pipe, prompt, seed=seed, steps=STEPS, height=SIZE, width=SIZE, negative_prompt="blurry")
    assert np.abs(negative.astype(int) - reference.astype(int)).max() <= 1


def test_flux_schnell_layout_is_served_without_guidance(tmp_path):
    """FLUX.1-schnell's transformer embeds no guidance: its repository's transformer takes no ``guidance`` input, and
    the repository's pipeline (in this process) draws diffusers' image with the engine, whatever scale is asked."""
    from diffusers import FluxTransformer2DModel

    from slimdiff.engines.build import build_denoiser_engine
    from slimdiff.engines.triton import build_serving_engines, write_repository
    from slimdiff.export.shapes import latent_multiple, parse_profiles
    from slimdiff.families import family_for
    from slimdiff.models import _seeded, build_builtin
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    dev = build_builtin("builtin:tiny-flux")
    config = {k: v for k, v in dev.transformer.config.items() if k != "_use_default_values"}
    transformer = _seeded(0, lambda: FluxTransformer2DModel(**{**config, "guidance_embeds": False}))
    pipe = type(dev)(**{**dev.components, "transformer": transformer.eval().requires_grad_(False)})
    pipe.set_progress_bar_config(disable=True)
    family, multiple = family_for(pipe), latent_multiple(transformer.config)
    build = {"profiles": parse_profiles("1", str(SIZE), str(SIZE), family.default_text_len(pipe),
                                        vae_scale=pipe.vae_scale_factor, multiple=multiple),
             "dtype": torch.float32, "device": "cpu", "multiple": multiple}
    (tmp_path / "transformer").mkdir()
    build_denoiser_engine(transformer, "ort", tmp_path / "transformer", **build)
    folders = build_serving_engines(pipe, tmp_path, "ort", **build)
    write_repository(tmp_path / "repo", pipe, tmp_path / "transformer", folders, "python", pipeline_instances=1)
    assert "guidance" not in _tensors(tmp_path / "repo", "transformer", "input")
    in_process = repository_pipeline(tmp_path / "repo" / "pipeline" / "1", local_runners(tmp_path / "repo"))
    use_engine(pipe, tmp_path / "transformer")
    prompt, seed = PROMPTS[0]
    images = [generate(in_process, prompt, seed=seed, steps=STEPS, height=SIZE, width=SIZE, guidance_scale=scale)
              for scale in (0.0, 3.5)]
    reference = generate(pipe, prompt, seed=seed, steps=STEPS, height=SIZE, width=SIZE, guidance_scale=0.0)
    assert np.array_equal(images[0], images[1]) and images[0].std() > 1
    assert np.abs(images[0].astype(int) - reference.astype(int)).max() <= 1
