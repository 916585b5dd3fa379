"""Guidance-distilled (LCM) UNets: ``time_cond_proj_dim`` set, the pipeline passes the embedded guidance scale as
``timestep_cond`` and samples without a guidance batch. The shared conformance suite runs calibration, slimming,
save/load and ONNX export for such a UNet (TestLCM); these tests check what is particular to it: the exported call,
the benchmark's inputs, engines in SD and SDXL pipelines, a Triton repository and the seeded sampling noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from call_recording import keyword_calls

from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for
from slimdiff.models import _seeded, build_builtin

GUIDANCE_WIDTH = 8
PROMPTS = ["a red cube on a table", "two blue spheres"]


def lcm_pipeline(builtin: str = "builtin:tiny"):
    """``builtin``'s pipeline with its UNet embedding the guidance scale (seeded weights, ``cond_proj`` included)
    and an LCM scheduler."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    pipe = build_builtin(builtin)
    config = {k: v for k, v in pipe.unet.config.items() if k != "_use_default_values"}
    unet = _seeded(0, lambda: UNet2DConditionModel(**{**config, "time_cond_proj_dim": GUIDANCE_WIDTH}))
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    lcm = type(pipe)(**{**pipe.components, "unet": unet.eval().requires_grad_(False), "scheduler": scheduler})
    lcm.set_progress_bar_config(disable=True)
    return lcm


@pytest.fixture(scope="module")
def sd():
    return lcm_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return lcm_pipeline("builtin:tiny-xl")


def _random_call(unet, family, batch=2):
    gen = torch.Generator().manual_seed(3)
    inputs = []
    for spec in family.export_inputs(unet.config):
        dims = [batch if d == "batch" else {"height": 8, "width": 8, "text_len": 77}.get(d, d) for d in spec.dims]
        inputs.append(torch.rand(dims, generator=gen) * 999 if spec.name == "timestep" else
                      torch.randn(dims, generator=gen))
    return inputs


@pytest.mark.parametrize("pipe_name, names", [
    ("sd", ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]),
    ("sdxl", ["sample", "timestep", "encoder_hidden_states", "timestep_cond", "text_embeds", "time_ids"]),
])
def test_the_guidance_embedding_is_an_exported_input(pipe_name, names, request):
    """Engines take ``timestep_cond`` after the text; the exported call passes it to the UNet as ``timestep_cond``
    (SDXL's conditions still in ``added_cond_kwargs``), and it changes the output."""
    unet = request.getfixturevalue(pipe_name).unet
    family = family_for(unet)
    assert [s.name for s in family.export_inputs(unet.config)] == names
    sample, t, text, cond, *added = _random_call(unet, family)
    extra = {"added_cond_kwargs": dict(zip(names[4:], added))} if added else {}
    with torch.no_grad():
        out = family.export_call(unet, sample, t, text, cond, *added)
        assert torch.equal(out, unet(sample, t, text, timestep_cond=cond, **extra).sample)
        assert not torch.allclose(out, unet(sample, t, text, **extra).sample, atol=1e-3)
    assert family.dummy_call(unet.config, 2, (8, 8))["timestep_cond"].shape == (2, GUIDANCE_WIDTH)


def test_the_benchmark_times_the_call_the_pipeline_makes(sd):
    """One UNet row per image (no classifier-free batch), and the benchmark's ``timestep_cond`` is the one the
    pipeline passes at its default guidance scale."""
    family = family_for(sd)
    assert family.guided_rows_per_image(sd.unet.config) == 1
    assert family.guided_rows_per_image(build_builtin("builtin:tiny").unet.config) == 2
    calls = keyword_calls(sd.unet, lambda: sd(PROMPTS[0], num_inference_steps=2, height=16, width=16,
                                               output_type="latent"))
    assert [c["encoder_hidden_states"].shape[0] for c in calls] == [1, 1]
    given = family.prompt_inputs(sd, PROMPTS[0], (16, 16), "cpu")
    torch.testing.assert_close(given["timestep_cond"], calls[0]["timestep_cond"], rtol=0, atol=1e-6)
    torch.testing.assert_close(given["encoder_hidden_states"], calls[0]["encoder_hidden_states"], rtol=0, atol=1e-6)


def test_calibration_noise_is_each_prompts_own(sd):
    """The LCM scheduler draws fresh noise at every step: the calibration loop draws it from each prompt's
    generator, so a prompt's trajectory depends neither on its batch nor on the global random state."""
    from slimdiff.calibrate import CalibrationConfig

    loop = family_for(sd).calibration_loop(sd, CalibrationConfig(steps=3, height=16, width=16))
    torch.manual_seed(0)
    both = keyword_calls(sd.unet, lambda: loop(PROMPTS, [5, 9]))
    torch.manual_seed(1)
    alone = keyword_calls(sd.unet, lambda: loop(PROMPTS[1:], [9]))
    assert len(both) == len(alone) == 3
    torch.testing.assert_close(alone[-1]["sample"][0], both[-1]["sample"][1], atol=1e-4, rtol=0)  # batch rounding
    # the step noise continues the prompt's generator: it is not the initial latent drawn again
    first, second = both[0]["sample"][0], both[1]["sample"][0]
    assert not torch.allclose(second / second.std(), first / first.std(), atol=0.1)


def _engine(pipe, folder):
    from slimdiff.engines.build import build_denoiser_engine
    from slimdiff.export.shapes import parse_profiles

    folder.mkdir()
    profiles = parse_profiles("1", "16", "16", "77", vae_scale=pipe.vae_scale_factor, multiple=4)
    build_denoiser_engine(pipe.unet, "ort", folder, profiles=profiles, dtype=torch.float32, device="cpu",
                          multiple=4)
    return folder


@pytest.mark.parametrize("pipe_name", ["sd", "sdxl"])
def test_an_engine_draws_the_pytorch_image_at_every_guidance_scale(pipe_name, request, tmp_path):
    from slimdiff.runtime import use_engine

    pipe = request.getfixturevalue(pipe_name)
    folder = _engine(pipe, tmp_path / "unet")
    served = type(pipe)(**pipe.components)
    served.set_progress_bar_config(disable=True)
    engine = use_engine(served, folder)

    def image(p, scale):
        return p(PROMPTS[0], num_inference_steps=2, guidance_scale=scale, height=16, width=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images

    for scale in (2.0, 8.0):
        np.testing.assert_allclose(image(served, scale), image(pipe, scale), atol=1e-4, rtol=0)
    assert np.abs(image(served, 2.0) - image(served, 8.0)).max() > 1e-3  # the embedded scale reaches the engine
    sample = torch.zeros(1, 4, 8, 8)
    text = torch.zeros(1, 77, pipe.unet.config.cross_attention_dim)
    with pytest.raises(SlimDiffError, match=r"needs timestep_cond of shape \(1, 8\)"):
        engine(sample, torch.tensor([10.0]), text, added_cond_kwargs=engine_conditions(pipe_name, 1))
    with pytest.raises(SlimDiffError, match=r"^timestep_cond has shape \(1, 4\); this engine takes \(1, 8\)$"):
        engine(sample, torch.tensor([10.0]), text, timestep_cond=torch.zeros(1, 4),
               added_cond_kwargs=engine_conditions(pipe_name, 1))


def engine_conditions(pipe_name: str, batch: int) -> dict | None:
    if pipe_name == "sd":
        return None
    return {"text_embeds": torch.zeros(batch, 64), "time_ids": torch.zeros(batch, 6)}


def test_an_engine_without_the_input_refuses_timestep_cond(tmp_path_factory):
    from export_support import cached_cli_export

    from slimdiff.runtime import EngineUNet

    root, _ = cached_cli_export(tmp_path_factory)  # the test run's engines of builtin:tiny
    engine = EngineUNet.from_folder(root / "engines" / "dense")
    with pytest.raises(SlimDiffError, match="engine UNets do not support timestep_cond"):
        engine(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), torch.zeros(1, 77, 32),
               timestep_cond=torch.zeros(1, GUIDANCE_WIDTH))


@pytest.mark.slow
def test_slimdiff_export_serves_an_lcm_folder_with_the_repository_inside_out(sd, tmp_path):
    """``slimdiff-export`` of a LatentConsistencyModelPipeline folder: slim and dense engines taking
    ``timestep_cond``, and a Triton repository written inside ``--out`` whose pipeline (run here in-process over
    the same engines) draws diffusers' image with the slim engine within one grey level."""
    from diffusers import LatentConsistencyModelPipeline

    from slimdiff.cli import export as export_cli
    from slimdiff.engines import load_engine_meta
    from slimdiff.models import load_pipeline
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    LatentConsistencyModelPipeline(**{**sd.components, "safety_checker": None, "feature_extractor": None},
                                   requires_safety_checker=False).save_pretrained(tmp_path / "lcm")
    out = tmp_path / "engines"
    rc = export_cli.main(["--model", str(tmp_path / "lcm"), "--engine", "ort", "--out", str(out),
                          "--triton-repo", str(out / "repo"), "--triton-mode", "python", "--height", "16",
                          "--width", "16", "--batch", "1", "--text-len", "77", "--num-prompts", "3", "--pass1-prompts", "1",
                          "--steps", "2", "--budget", "0.3", "--device", "cpu"])
    assert rc == 0
    for variant in ("dense", "slim"):
        meta, _ = load_engine_meta(out / variant, "unet")
        assert [i["name"] for i in meta["inputs"]][3:] == ["timestep_cond"]
    repo = out / "repo"
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder", "unet", "vae_decoder"]
    in_process = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
    pipe = load_pipeline(str(out / "slim-unet"))
    use_engine(pipe, out / "slim")
    for scale in (2.0, 8.0):
        options = dict(seed=3, steps=2, height=16, width=16, guidance_scale=scale)
        served, reference = generate(in_process, PROMPTS[0], **options), generate(pipe, PROMPTS[0], **options)
        assert np.abs(served.astype(int) - reference.astype(int)).max() <= 1 and served.std() > 1


def test_calibrating_at_more_steps_than_lcm_samples_is_one_warning(sd):
    """An LCM model is used at 2-8 steps: calibrating it at 9 or more says so (and runs); at 4 it says nothing."""
    import warnings

    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.errors import SlimDiffWarning

    config = CalibrationConfig(steps=9, pass1_prompts=1, batch_size=1, height=16, width=16)
    with pytest.warns(SlimDiffWarning, match=r"an LCM model, sampled in 2-8 steps\): calibrating at 9 steps"):
        assert calibrate(sd, PROMPTS[:1], None, config, progress=False) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlimDiffWarning)
        calibrate(sd, PROMPTS[:1], None, CalibrationConfig(steps=4, pass1_prompts=1, batch_size=1, height=16,
                                                           width=16), progress=False)
