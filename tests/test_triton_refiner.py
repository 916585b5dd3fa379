"""A Triton repository serving SDXL's ensemble of expert denoisers (``slimdiff-export --refiner``): the base's
pipeline runs the schedule up to ``refiner_start`` and the refiner's the rest on its latents, over the base's text
encoders and VAE and a second UNet engine. Checked in this process against diffusers' own ensemble around the same
two engines, refused where it does not apply, and written by the command and served by the bundled ``tritonserver``
(python backend, CPU, loopback). Seeded tiny models, ONNX Runtime."""

import json

import numpy as np
import pytest
import torch
from export_support import TWO_LEVEL_XL_REFINER_UNET, TWO_LEVEL_XL_UNET, seeded_unet, write_slim_pipeline
from serving_support import SIZE, write_tiny_repository

from slimdiff.cli.export import main as export_main
from slimdiff.errors import SlimDiffError
from slimdiff.models import build_builtin

pytest.importorskip("tritonclient.http")

STEPS = 4
PROMPT = "a red circle above a blue square"


def _pipelines():
    """(base, refiner): builtin:tiny-xl and builtin:tiny-xl-refiner (whose second text tower and VAE are the base's)
    with two-level seeded UNets."""
    base, refiner = build_builtin("builtin:tiny-xl"), build_builtin("builtin:tiny-xl-refiner")
    base.unet = seeded_unet(TWO_LEVEL_XL_UNET, seed=7)
    refiner.unet = seeded_unet(TWO_LEVEL_XL_REFINER_UNET, seed=8)
    return base, refiner


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """``(root, base, refiner)``: ONNX Runtime engines of both UNets, the base's text encoders and VAE decoder, and
    the python-mode repository ``root/repo`` serving the ensemble, written by the calls ``slimdiff-export
    --triton-repo --refiner`` makes."""
    root = tmp_path_factory.mktemp("refiner-ensemble-repo")
    base, refiner = _pipelines()
    write_tiny_repository(base, root, refiner=refiner)
    return root, base, refiner


def test_the_repository_serves_the_refiner_unet_and_takes_refiner_start(repository):
    from slimdiff.engines.triton import _pb, read_config

    root, _, _ = repository
    repo = root / "repo"
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "refiner_unet", "text_encoder", "text_encoder_2",
                                                      "unet", "vae_decoder"]
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == "StableDiffusionXLPipeline"
    assert spec["refiner"]["pipeline_class"] == "StableDiffusionXLImg2ImgPipeline"
    assert spec["refiner"]["options"]["requires_aesthetics_score"] is True
    pb, _ = _pb()
    inputs = {t.name: (t.data_type, list(t.dims), t.optional)
              for t in read_config(repo / "pipeline" / "config.pbtxt").input}
    assert inputs["refiner_start"] == (pb.TYPE_FP32, [1], True) and "image" not in inputs


def _diffusers_ensemble(root, base, refiner, seed: int, start: float) -> np.ndarray:
    """diffusers' ensemble of expert denoisers with the two UNet engines: the base to ``start`` as latents, the
    refiner (sharing the base's second text tower and VAE) from there; uint8 pixels."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from slimdiff.quality.sampling import with_denoiser
    from slimdiff.runtime import use_engine

    base = with_denoiser(base, base.unet)
    use_engine(base, root / "unet")
    second = StableDiffusionXLImg2ImgPipeline(vae=base.vae, text_encoder=None, tokenizer=None,
                                              text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                                              unet=refiner.unet, scheduler=refiner.scheduler,
                                              requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    second.set_progress_bar_config(disable=True)
    use_engine(second, root / "refiner")
    generator = torch.Generator().manual_seed(seed)
    latents = base(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=generator, height=SIZE,
                   width=SIZE, denoising_end=start, output_type="latent").images
    image = second(PROMPT, image=latents, num_inference_steps=STEPS, guidance_scale=7.5, generator=generator,
                   denoising_start=start, output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)


def test_served_ensemble_is_diffusers_ensemble_with_the_engines(repository):
    """The repository's ensemble (in this process, over the same engines) draws what diffusers' ensemble of expert
    denoisers draws around the two UNet engines, within one grey level; where the refiner takes over matters."""
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline, repository_refiner

    root, base, refiner = repository
    version = root / "repo" / "pipeline" / "1"
    served = repository_pipeline(version, local_runners(root / "repo"))
    second = repository_refiner(version, local_runners(root / "repo"), served)
    options = dict(seed=3, steps=STEPS, height=SIZE, width=SIZE, refiner_start=0.5)
    got = generate(served, PROMPT, refiner=second, **options)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 1
    expected = _diffusers_ensemble(root, base, refiner, 3, 0.5)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served, PROMPT, refiner=second, **{**options, "refiner_start": 0.75}))
    assert not np.array_equal(got, generate(served, PROMPT, **{k: v for k, v in options.items()
                                                                if k != "refiner_start"}))  # the base alone
    with pytest.raises(SlimDiffError, match=r"refiner_start 1.0 is outside \(0, 1\)"):
        generate(served, PROMPT, refiner=second, **{**options, "refiner_start": 1.0})
    with pytest.raises(SlimDiffError, match=r"takes no refiner_start: the repository serves no refiner"):
        generate(served, PROMPT, **options)


def test_a_refiner_is_refused_where_it_does_not_apply():
    """One line before any work: a base without a refiner family, a model that is not the refiner, and a
    repository taking image-to-image requests."""
    from slimdiff.engines.triton import check_pipeline

    base, refiner = _pipelines()
    with pytest.raises(SlimDiffError, match=r"a repository serving StableDiffusionPipeline takes no refiner"):
        check_pipeline(build_builtin("builtin:tiny"), refiner=refiner)
    with pytest.raises(SlimDiffError, match=r"--refiner is a 'sdxl' model \(StableDiffusionXLPipeline\), not a "
                                            r"refiner of StableDiffusionXLPipeline \('sdxl-refiner'\)"):
        check_pipeline(base, refiner=build_builtin("builtin:tiny-xl"))
    with pytest.raises(SlimDiffError, match=r"StableDiffusionXLPipeline with image-to-image requests takes no "
                                            "refiner"):
        check_pipeline(base, image_to_image=True, refiner=refiner)
    from slimdiff.errors import SlimDiffWarning

    with torch.no_grad():
        refiner.text_encoder_2.text_projection.weight.mul_(1.01)
    with pytest.warns(SlimDiffWarning, match=r"the refiner's text_encoder_2 weights differ from the base's; the "
                                             r"repository serves the base's to both"):
        assert check_pipeline(base, refiner=refiner).refiner_class == "StableDiffusionXLImg2ImgPipeline"
    refiner.vae = build_builtin("builtin:tiny").vae.__class__(**dict(refiner.vae.config, latent_channels=8))
    with pytest.raises(SlimDiffError, match=r"the refiner's vae is shaped unlike the base's"):
        check_pipeline(base, refiner=refiner)


def test_the_command_refuses_a_refiner_without_a_repository_or_that_is_missing(tmp_path, capsys):
    code = export_main(["--model", "builtin:tiny-xl", "--refiner", "builtin:tiny-xl-refiner", "--engine", "ort",
                        "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--refiner is an option of the Triton repository" in err[0], err
    code = export_main(["--model", "builtin:tiny-xl", "--refiner", str(tmp_path / "missing"), "--engine", "ort",
                        "--out", str(tmp_path / "out"), "--triton-repo", str(tmp_path / "repo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].endswith(f"--refiner: model path {str(tmp_path / 'missing')!r} does not exist"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_tritonserver_serves_the_ensemble_written_by_the_command(tmp_path):
    """`slimdiff-export --model SLIM --refiner builtin:tiny-xl-refiner --triton-repo` (python mode; SLIM: a slim
    pipeline folder of builtin:tiny-xl): the refiner's engine is built and verified beside the slim base's, and the
    real tritonserver answers a request with the in-process ensemble's image bit for bit."""
    import tritonclient.http as httpclient

    from slimdiff.engines.triton import local_server, request_image
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline, repository_refiner

    out, repo = tmp_path / "engines", tmp_path / "repo"
    base = write_slim_pipeline(tmp_path / "slim-xl", model="builtin:tiny-xl")
    assert export_main(["--model", str(base), "--refiner", "builtin:tiny-xl-refiner", "--engine", "ort",
                        "--out", str(out), "--triton-repo", str(repo), "--triton-mode", "python", "--batch", "2",
                        "--height", "32", "--width", "32", "--text-len", "77", "--device", "cpu", "--fp32"]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "export.json").read_text())["rows"]}
    assert rows["refiner"]["max_rel_error"] <= 1e-4 and rows["refiner"]["parameters"] > 0
    version = repo / "pipeline" / "1"
    served = repository_pipeline(version, local_runners(repo))
    expected = generate(served, PROMPT, refiner=repository_refiner(version, local_runners(repo), served), seed=4,
                        steps=STEPS, height=32, width=32, refiner_start=0.5)
    with local_server(repo, timeout_s=180, log=tmp_path / "server.log") as urls:
        client = httpclient.InferenceServerClient(urls["http"])
        got = request_image(client, PROMPT, 4, STEPS, height=32, width=32, refiner_start=0.5)
        assert np.array_equal(got, expected)
