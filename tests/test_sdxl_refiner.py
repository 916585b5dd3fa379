"""The SDXL refiner end to end: told apart from the base by its UNet, loaded from a pipeline folder, calibrated on
the images it refines (``--images``, ``--strength``) by ``slimdiff slim`` or on an SDXL base's latents as in diffusers'
ensemble of expert denoisers (``--base``, ``--refiner-start``), compared by ``slimdiff eval``, exported
as an ONNX Runtime engine that drives the refiner pipeline, and served by a Triton repository whose requests carry
the image to refine (in this process; the bundled ``tritonserver`` serves the refiner after the base in
tests/test_triton_refiner.py, and image inputs in the inpainting and image-to-image tests). Seeded tiny models
(builtin:tiny-xl-refiner), few steps, CPU."""

import json
import shutil

import numpy as np
import pytest
import torch
from export_support import TWO_LEVEL_XL_REFINER_UNET, seeded_unet
from serving_support import SIZE, noise_image, write_tiny_repository

from slimdiff.cli import main
from slimdiff.cli.export import main as export_main
from slimdiff.configs import SDXL_REFINER_UNET, SDXL_UNET, TINY_XL_REFINER_UNET, TINY_XL_UNET
from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for, transformer_blocks
from slimdiff.families.sdxl import is_refiner_unet
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.runtime import use_engine
from slimdiff.serialization import load_slim

PROMPT = "a red circle above a blue square"
# int(4 × 0.5) = 2 refining steps per prompt
FAST = ["--num-prompts", "2", "--steps", "4", "--strength", "0.5", "--pass1-prompts", "1", "--budget", "0.4"]
SHAPES = ["--batch", "2", "--height", "128", "--width", "128", "--text-len", "77", "--device", "cpu", "--fp32"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three seeded noise photographs-to-be of odd sizes (calibration resizes them)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("refiner-images")
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def slim_refiner(tmp_path_factory, images):
    """(refiner pipeline folder saved by diffusers, its slim UNet folder written by `slimdiff slim`)."""
    root = tmp_path_factory.mktemp("refiner")
    build_builtin("builtin:tiny-xl-refiner").save_pretrained(root / "pipe", safe_serialization=True)
    assert main(["slim", "--model", str(root / "pipe"), "--images", str(images), *FAST, "--out",
                 str(root / "slim")]) == 0
    return root / "pipe", root / "slim"


def test_the_refiner_is_told_from_the_base_by_its_unet():
    """Five time ids beside a pooled embedding as wide as the text context: the published configurations and the
    tiny ones; the pipelines and their bare UNets land in their families."""
    assert is_refiner_unet(SDXL_REFINER_UNET) and is_refiner_unet(TINY_XL_REFINER_UNET)
    assert not is_refiner_unet(SDXL_UNET) and not is_refiner_unet(TINY_XL_UNET)
    refiner, base = build_builtin("builtin:tiny-xl-refiner"), build_builtin("builtin:tiny-xl")
    assert family_for(refiner).name == family_for(refiner.unet).name == "sdxl-refiner"
    assert family_for(base).name == family_for(base.unet).name == "sdxl"
    inputs = {c.name: c.dims for c in family_for(refiner.unet).condition_inputs(refiner.unet.config)}
    assert inputs == {"text_embeds": ("batch", 32), "time_ids": ("batch", 5)}


def test_the_published_refiner_shape():
    """builtin:sdxl-refiner-shape is SDXL-refiner 1.0's UNet: 2.26 B parameters, 44 transformer blocks of 64-wide
    heads (four per attention at two levels and in the mid block), conditioned on 1280-wide text."""
    pipe = build_builtin("builtin:sdxl-refiner-shape", device="meta")
    unet = pipe.unet
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 2260
    blocks = transformer_blocks(unet)
    assert len(blocks) == 44 and {b.attn1.heads * 64 for _, b, _ in blocks} == {768, 1536}
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score


def test_a_refiner_folder_loads_as_its_image_to_image_pipeline(tmp_path, capsys):
    build_builtin("builtin:tiny-xl-refiner").save_pretrained(tmp_path / "pipe", safe_serialization=True)
    pipe = load_pipeline(str(tmp_path / "pipe"))
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline" and pipe.config.requires_aesthetics_score
    assert family_for(pipe).name == "sdxl-refiner"
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert main(["slim", "--model", str(tmp_path / "pipe"), "--budget", "0.4", "--out", str(tmp_path / "slim")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SDXL refiner folder without text_encoder_2" in err[0], err
    assert not (tmp_path / "slim").exists()
    # a base folder around the refiner's UNet (five time ids): refused before its first UNet call would fail
    build_builtin("builtin:tiny-xl").save_pretrained(tmp_path / "base", safe_serialization=True)
    shutil.rmtree(tmp_path / "base" / "unet")
    shutil.copytree(tmp_path / "pipe" / "unet", tmp_path / "base" / "unet")
    with pytest.raises(SlimDiffError, match="is an SDXL base folder .* holding a refiner UNet .*: the folder mixes"):
        load_pipeline(str(tmp_path / "base"))


def test_calibration_needs_images_and_a_refining_step(tmp_path, images, capsys):
    """Refused in one line before any sampling: no images (nor a base); steps × strength below one step; a strength
    outside (0, 1]; images and a strength given to a text-to-image model (which would ignore them)."""
    out = tmp_path / "slim"
    assert main(["slim", "--model", "builtin:tiny-xl-refiner", "--budget", "0.4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the SDXL refiner is calibrated on the images it refines" in err[0], err
    assert err[0].endswith("or the SDXL base whose latents it refines (`--base MODEL`)"), err
    assert main(["slim", "--model", "builtin:tiny-xl-refiner", "--images", str(images), "--steps", "3",
                 "--budget", "0.4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 steps at strength 0.3 run no denoising step" in err[0], err
    assert main(["slim", "--model", "builtin:tiny-xl-refiner", "--images", str(images), "--strength", "1.5",
                 "--budget", "0.4", "--out", str(out)]) == 2
    assert "strength 1.5 is outside (0, 1]" in capsys.readouterr().err
    assert main(["slim", "--model", "builtin:tiny-xl", "--images", str(images), "--strength", "0.5",
                 "--budget", "0.4", "--out", str(out)]) == 2
    assert "images and strength given, but StableDiffusionXLPipeline takes no image" in capsys.readouterr().err
    assert not out.exists()


def test_calibration_visits_the_refiners_timesteps(images):
    """The refiner's calibration visits only the low-noise end of the schedule: strength 0.5 of 10 steps runs the
    last five of the ten timesteps, no more."""
    from slimdiff.calibrate import CalibrationConfig, calibrate

    pipe = build_builtin("builtin:tiny-xl-refiner")
    stats = calibrate(pipe, ["a red cube"], None, CalibrationConfig(steps=10, strength=0.5, pass1_prompts=1,
                                                                     height=32, width=32, images=str(images)),
                      progress=False)
    pipe.scheduler.set_timesteps(10)
    assert sorted(stats.timesteps) == sorted(int(t) for t in pipe.scheduler.timesteps[5:])


def _hand_written_ensemble_loop(base, refiner, steps, start):
    """The README's loop you own: the base to ``denoising_end``, the refiner from ``denoising_start`` on its latents."""
    def ensemble_loop(prompts, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        latents = base(list(prompts), num_inference_steps=steps, denoising_end=start, generator=generators,
                       output_type="latent").images
        refiner(list(prompts), image=latents, num_inference_steps=steps, denoising_start=start, generator=generators,
                output_type="latent")

    return ensemble_loop


def test_the_refiner_calibrates_on_the_base_latents_with_a_loop_you_own():
    """A hand-written ensemble loop (diffusers' documented one): calibration hooks whatever sampling the loop runs with the refiner's UNet — here
    the base's latents at half the schedule, refined from there: the refiner's statistics visit only the timesteps
    after the split."""
    import slimdiff

    base, refiner = build_builtin("builtin:tiny-xl"), build_builtin("builtin:tiny-xl-refiner")
    stats = slimdiff.collect_statistics(refiner, ["a red cube", "two blue spheres"], 2,
                                        calibration=slimdiff.CalibrationConfig(steps=10, pass1_prompts=1),
                                        loop=_hand_written_ensemble_loop(base, refiner, 10, 0.5), progress=False)
    refiner.scheduler.set_timesteps(10)
    assert sorted(stats.timesteps) == sorted(int(t) for t in refiner.scheduler.timesteps if t < 500)
    report = slimdiff.slim_pipeline(refiner, slimdiff.SlimConfig(budget=0.4), stats=stats, progress=False)
    assert report.plan.params_removed > 0


# the command line's calibration on the base's latents: two prompts of a file (no SlimSet selection from COCO)
ENSEMBLE = ["--num-prompts", "2", "--pass1-prompts", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ensemble-prompts") / "prompts.txt"
    path.write_text("a red cube\ntwo blue spheres\n", encoding="utf-8")
    return path


def test_calibrating_on_the_base_latents_visits_the_refiners_share_of_the_schedule(tmp_path, prompt_file, capsys):
    """`slimdiff calibrate --base` (hand-over at the default 0.8 of 10 steps) visits exactly the timesteps the refiner's
    UNet is called at in a plain diffusers ensemble of expert denoisers, once each; the statistics record the base and
    the hand-over, and a rerun into the same folder with another hand-over is refused."""
    from slimdiff.calibrate import Statistics
    from slimdiff.families.refiner import ensemble_shares

    out = tmp_path / "stats"
    assert main(["calibrate", "--model", "builtin:tiny-xl-refiner", "--base", "builtin:tiny-xl", "--steps", "10",
                 "--prompts", str(prompt_file), *ENSEMBLE, "--out", str(out)]) == 0
    stats = Statistics.load(out)
    base, refiner = build_builtin("builtin:tiny-xl"), build_builtin("builtin:tiny-xl-refiner")
    seen = []
    refiner.unet.register_forward_pre_hook(lambda _m, args: seen.append(int(args[1])))
    latents = base(PROMPT, num_inference_steps=10, denoising_end=0.8, output_type="latent").images
    refiner(PROMPT, image=latents, num_inference_steps=10, denoising_start=0.8, output_type="latent")
    assert seen and stats.timesteps == seen and stats.visits == [1] * len(seen)
    assert len(seen) == ensemble_shares(refiner.scheduler, 10, 0.8)[1] < 10
    assert (stats.config.base, stats.config.refiner_start, stats.config.images) == ("builtin:tiny-xl", 0.8, None)
    capsys.readouterr()
    assert main(["calibrate", "--model", "builtin:tiny-xl-refiner", "--base", "builtin:tiny-xl", "--steps", "10",
                 "--refiner-start", "0.7", "--prompts", str(prompt_file), *ENSEMBLE, "--out", str(out)]) == 2
    assert "were collected with different config" in capsys.readouterr().err


def test_the_command_line_calibrates_as_the_loop_you_own(tmp_path, prompt_file):
    """`slimdiff calibrate --base --refiner-start 0.5` collects the statistics a hand-written ensemble loop collects with
    the same prompts and seeds, bit for bit: both sample the base and the refiner alike."""
    import slimdiff
    from slimdiff.calibrate import Statistics

    out = tmp_path / "stats"
    assert main(["calibrate", "--model", "builtin:tiny-xl-refiner", "--base", "builtin:tiny-xl", "--steps", "6",
                 "--refiner-start", "0.5", "--prompts", str(prompt_file), *ENSEMBLE, "--out", str(out)]) == 0
    cli = Statistics.load(out)
    base, refiner = build_builtin("builtin:tiny-xl"), build_builtin("builtin:tiny-xl-refiner")
    own = slimdiff.collect_statistics(refiner, prompt_file.read_text().splitlines(), 2,
                                      calibration=slimdiff.CalibrationConfig(steps=6, pass1_prompts=1),
                                      loop=_hand_written_ensemble_loop(base, refiner, 6, 0.5), progress=False)
    refiner.scheduler.set_timesteps(6)
    assert cli.timesteps == own.timesteps == [int(t) for t in refiner.scheduler.timesteps if t < 500]
    assert cli.visits == own.visits and cli.fingerprint == own.fingerprint
    assert set(cli.tensors) == set(own.tensors)
    differ = [k for k in own.tensors if not torch.equal(cli.tensors[k], own.tensors[k])]
    assert not differ, differ[:5]
    assert all(torch.equal(cli.timestep_weights[k], w) for k, w in own.timestep_weights.items())


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """SDXL base folders whose latents do not fit builtin:tiny-xl-refiner: 8 latent channels (UNet and VAE); a VAE
    down-sampling twice as far; a VAE of another scaling factor."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    from slimdiff.configs import TINY_VAE

    root = tmp_path_factory.mktemp("bases")
    base = build_builtin("builtin:tiny-xl")
    wide = {"unet": UNet2DConditionModel(**dict(TINY_XL_UNET, in_channels=8, out_channels=8)),
            "vae": AutoencoderKL(**dict(TINY_VAE, latent_channels=8))}
    deeper = {"vae": AutoencoderKL(**dict(TINY_VAE, block_out_channels=(16, 32, 32),
                                          down_block_types=("DownEncoderBlock2D",) * 3,
                                          up_block_types=("UpDecoderBlock2D",) * 3))}
    for name, parts in (("8-channels", wide), ("vae-down", deeper), ("vae-factor", {})):
        StableDiffusionXLPipeline(**{**base.components, **parts}).save_pretrained(root / name,
                                                                                   safe_serialization=True)
    config = root / "vae-factor" / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "scaling_factor": 0.5}))
    return root


REFUSALS = [  # (model, extra flags, the fragment of the one error line)
    ("builtin:tiny-xl", ["--base", "builtin:tiny-xl"],
     "a base model given (--base), but StableDiffusionXLPipeline is no refiner"),
    ("builtin:tiny-xl-refiner", ["--base", "builtin:tiny-xl-refiner"],
     "--base 'builtin:tiny-xl-refiner' is a StableDiffusionXLImg2ImgPipeline ('sdxl-refiner' family), not an SDXL base"),
    ("builtin:tiny-xl-refiner", ["--base", "builtin:tiny"],
     "--base 'builtin:tiny' is a StableDiffusionPipeline ('sd' family), not an SDXL base"),
    ("builtin:tiny-xl-refiner", ["--base", "builtin:tiny-pixart"],
     "is a PixArtSigmaPipeline ('pixart' family), not an SDXL base"),
    ("builtin:tiny-xl-refiner", ["--base", "{bases}/8-channels"],
     "draws 8-channel latents (its VAE's), the refiner's UNet takes 4"),
    ("builtin:tiny-xl-refiner", ["--base", "{bases}/vae-down"],
     "VAE scales latents unlike the refiner's (1/4 of the image, × 0.18215 against 1/2, × 0.18215)"),
    ("builtin:tiny-xl-refiner", ["--base", "{bases}/vae-factor"],
     "VAE scales latents unlike the refiner's (1/2 of the image, × 0.5 against 1/2, × 0.18215)"),
    ("builtin:tiny-xl-refiner", ["--base", "{bases}/nowhere"], "--base: model path"),
    ("builtin:tiny-xl-refiner", ["--base", "builtin:tiny-xl", "--images", "{images}"],
     "a base model and images given: calibrate the refiner either on the base model's latents (--base) or on "
     "photographs (--images, --strength), not both"),
    ("builtin:tiny-xl-refiner", ["--base", "builtin:tiny-xl", "--strength", "0.2"],
     "a base model and strength given"),
    ("builtin:tiny-xl-refiner", ["--base", "builtin:tiny-xl", "--refiner-start", "1"],
     "refiner start 1.0 is outside (0, 1)"),
    ("builtin:tiny-xl-refiner", ["--base", "builtin:tiny-xl", "--refiner-start", "0"],
     "refiner start 0.0 is outside (0, 1)"),
    ("builtin:tiny-xl-refiner", ["--images", "{images}", "--refiner-start", "0.5"],
     "--refiner-start is where the base model hands its latents to the refiner: give --base too"),
    # timesteps 901…1: none below round(1000 − 999.9) = 0
    ("builtin:tiny-xl-refiner", ["--base", "builtin:tiny-xl", "--refiner-start", "0.9999"],
     "10 steps handing over at 0.9999 (the cut-off timestep round((1 − 0.9999) × T)) leave the refiner no step"),
    # timesteps 501 and 1: none at or above round(1000 − 200) = 800
    ("builtin:tiny-xl-refiner", ["--base", "builtin:tiny-xl", "--refiner-start", "0.2", "--steps", "2"],
     "2 steps handing over at 0.2 (the cut-off timestep round((1 − 0.2) × T)) leave the base model no step"),
]


@pytest.mark.parametrize("model, flags, fragment", REFUSALS, ids=[
    "not-a-refiner", "base-is-a-refiner", "base-is-sd", "base-is-pixart", "latent-channels", "vae-down-sampling",
    "vae-scaling-factor", "base-missing", "base-and-images", "base-and-strength", "start-one", "start-zero",
    "start-without-base", "no-refiner-step", "no-base-step"])
def test_calibration_on_a_base_refuses_what_cannot_be_its_ensemble(model, flags, fragment, bases, images, tmp_path,
                                                                  monkeypatch, capsys):
    """`slimdiff slim --base`: one line, exit status 2, before either pipeline samples anything, nothing written."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    def no_sampling(*args, **kwargs):
        raise AssertionError("a pipeline sampled before the bad input was noticed")

    for cls in (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline):
        monkeypatch.setattr(cls, "__call__", no_sampling)
    flags = [f.replace("{bases}", str(bases)).replace("{images}", str(images)) for f in flags]
    steps = [] if "--steps" in flags else ["--steps", "10"]
    assert main(["slim", "--model", model, *flags, *steps, "--num-prompts", "2", "--budget", "0.4",
                 "--out", str(tmp_path / "slim")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimdiff: error: ") and fragment in err[0], err
    assert not list(tmp_path.iterdir())


def test_slim_and_eval_on_a_refiner_folder(slim_refiner, images, tmp_path):
    folder, slim = slim_refiner
    plan = json.loads((slim / "slimdiff_plan.json").read_text())
    assert plan["info"]["source_model"] == str(folder.resolve())
    assert plan["info"]["calibration"]["strength"] == 0.5
    assert load_slim(slim).slim_plan.params_removed > 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    assert main(["eval", "--model", str(folder), "--slim", str(slim), "--prompts", str(prompts), "--num", "2",
                 "--steps", "4", "--batch-size", "2", "--out", str(tmp_path / "eval")]) == 0
    assert any((tmp_path / "eval").iterdir())
    # on the images given (refined at strength 0.5: two of four steps), which change what is drawn
    assert main(["eval", "--model", str(folder), "--slim", str(slim), "--prompts", str(prompts), "--num", "2",
                 "--steps", "4", "--batch-size", "2", "--images", str(images), "--strength", "0.5",
                 "--save-images", "--out", str(tmp_path / "eval-images")]) == 0
    report = json.loads((tmp_path / "eval-images" / "report.json").read_text())
    assert report["settings"]["starting_images"] == str(images) and report["settings"]["unet_calls_per_image"] == 2
    synthetic = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["metrics"]["fidelity"] != synthetic["metrics"]["fidelity"]



def test_eval_compares_the_refiner_after_the_base(tmp_path, prompt_file, capsys):
    """`slimdiff eval --base`: the dense base samples to the hand-over and each refiner refines its latents — the
    dense image is the one diffusers' ensemble draws by hand from the same seeded latents and generators, and only
    the refiner's share of the schedule reaches the (probed) refiner UNet; bad combinations are refused in one
    line before anything samples."""
    from slimdiff.families import image_generators
    from slimdiff.quality.sampling import generate

    base, refiner = build_builtin("builtin:tiny-xl"), build_builtin("builtin:tiny-xl-refiner")
    drawn = generate(refiner, ["a red circle"], [3], steps=4, guidance=5.0, size=32, base=base, refiner_start=0.5)
    generators = image_generators([3])
    latents = family_for(base).seeded_latents(base.unet.config, (16, 16), generators)
    handed = base(["a red circle"], num_inference_steps=4, guidance_scale=5.0, latents=latents, generator=generators,
                  height=32, width=32, denoising_end=0.5, output_type="latent").images
    by_hand = refiner(["a red circle"], image=handed, num_inference_steps=4, guidance_scale=5.0,
                      denoising_start=0.5, generator=generators, output_type="np").images
    assert np.array_equal(drawn, np.asarray(by_hand, dtype=np.float32))
    assert not np.array_equal(drawn, generate(refiner, ["a red circle"], [3], steps=4, guidance=5.0, size=32))

    common = ["--prompts", str(prompt_file), "--num", "1", "--steps", "4", "--resolution", "32"]
    assert main(["eval", "--model", "builtin:tiny-xl-refiner", "--slim", "builtin:tiny-xl-refiner", "--base",
                 "builtin:tiny-xl", "--refiner-start", "0.5", *common, "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["base"] == "builtin:tiny-xl" and report["settings"]["refiner_start"] == 0.5
    assert report["settings"]["unet_calls_per_image"] == 2  # two of four steps: the refiner's half
    capsys.readouterr()
    for flags, fragment in ((["--model", "builtin:tiny-xl", "--slim", "builtin:tiny-xl", "--base", "builtin:tiny-xl"],
                             "StableDiffusionXLPipeline is no refiner"),
                            (["--model", "builtin:tiny-xl-refiner", "--slim", "builtin:tiny-xl-refiner", "--base",
                              "builtin:tiny"], "not an SDXL base"),
                            (["--model", "builtin:tiny-xl-refiner", "--slim", "builtin:tiny-xl-refiner",
                              "--refiner-start", "0.5"], "give --base too")):
        assert main(["eval", *flags, *common, "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert fragment in err[-1] and not (tmp_path / "refused").exists(), err

def test_bench_calibrates_the_refiner_on_images(tmp_path, images, capsys):
    """`slimdiff bench --calib-prompts` on the refiner takes calibration's images and strength (real slim models:
    their error against the dense one is measured); images without calibration are refused in one line."""
    out = tmp_path / "bench"
    assert main(["bench", "--model", "builtin:tiny-xl-refiner", "--calib-prompts", "2", "--calib-steps", "4",
                 "--images", str(images), "--strength", "0.5", "--engines", "eager", "--budgets", "0,0.4",
                 "--batch", "2", "--iters", "2", "--warmup", "0", "--no-e2e", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "calibrated here" in json.dumps(report)
    slim = [r for r in report["results"] if r["budget"] > 0]
    assert slim and all(r["error_vs_dense"] > 0 for r in slim)
    capsys.readouterr()
    assert main(["bench", "--model", "builtin:tiny-xl-refiner", "--images", str(images), "--calib-prompts", "0",
                 "--out", str(tmp_path / "again")]) == 2
    assert "--images and --strength are calibration's: give --calib-prompts N too" in capsys.readouterr().err


def test_bench_calibrates_the_refiner_on_the_base_latents(tmp_path, capsys):
    """`slimdiff bench --calib-prompts --base` calibrates the refiner after the base (the report says so); a base
    without calibration, or a hand-over without a base, is refused in one line."""
    out = tmp_path / "bench"
    assert main(["bench", "--model", "builtin:tiny-xl-refiner", "--calib-prompts", "2", "--calib-steps", "4",
                 "--base", "builtin:tiny-xl", "--refiner-start", "0.5", "--engines", "eager", "--budgets", "0,0.4",
                 "--batch", "2", "--iters", "2", "--warmup", "0", "--no-e2e", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "refining the latents of builtin:tiny-xl from 0.5 of the schedule on" in json.dumps(report)
    slim = [r for r in report["results"] if r["budget"] > 0]
    assert slim and all(r["error_vs_dense"] > 0 for r in slim)
    capsys.readouterr()
    assert main(["bench", "--model", "builtin:tiny-xl-refiner", "--base", "builtin:tiny-xl", "--calib-prompts", "0",
                 "--out", str(tmp_path / "again")]) == 2
    assert "--base and --refiner-start are calibration's: give --calib-prompts N too" in capsys.readouterr().err
    assert main(["bench", "--model", "builtin:tiny-xl-refiner", "--refiner-start", "0.5", "--calib-prompts", "2",
                 "--out", str(tmp_path / "again")]) == 2
    assert "--refiner-start is where the base model hands its latents to the refiner: give --base too" in \
        capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_eval_refuses_starting_images_for_a_text_to_image_model(tmp_path, images, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["eval", "--model", "builtin:tiny-xl", "--slim", "builtin:tiny-xl", "--prompts", str(prompts),
                 "--num", "1", "--images", str(images), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--images: StableDiffusionXLPipeline takes no image (only inpainting models, FLUX "
                            "Control, FLUX Kontext and the SDXL refiner take one)"), err
    assert not (tmp_path / "eval").exists()


def _refined(pipe, image):
    return pipe(PROMPT, image=image, strength=0.5, num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                output_type="np").images[0]


@pytest.mark.slow
def test_export_and_use_engine_in_the_refiner_pipeline(slim_refiner, tmp_path):
    from PIL import Image

    _, slim = slim_refiner
    out = tmp_path / "engines"
    assert export_main(["--model", str(slim), "--engine", "ort", "--out", str(out), *SHAPES]) == 0
    row = json.loads((out / "export.json").read_text())["rows"][0]
    assert row["variant"] == "slim" and row["max_rel_error"] <= 1e-4
    pipe = load_pipeline(str(slim))  # the refiner pipeline the slim UNet came from, with the slim UNet in it
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline" and pipe.config.requires_aesthetics_score
    image = Image.fromarray(noise_image(3, size=32))
    reference = _refined(pipe, image)
    use_engine(pipe, out / "slim")
    assert np.abs(_refined(pipe, image) - reference).max() < 1e-3


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """``(root, pipe)``: ONNX Runtime engines of builtin:tiny-xl-refiner (a two-level UNet of its layout, second text
    encoder, VAE decoder and encoder) and the python-mode repository ``root/repo`` serving it, written by the calls
    ``slimdiff-export --triton-repo`` makes."""
    root = tmp_path_factory.mktemp("refiner-repo")
    pipe = build_builtin("builtin:tiny-xl-refiner")
    pipe.unet = seeded_unet(TWO_LEVEL_XL_REFINER_UNET, seed=7)  # the refiner's layout at two levels: a faster export
    write_tiny_repository(pipe, root)
    return root, pipe


def test_the_repository_serves_the_second_tower_and_takes_an_image(repository):
    from slimdiff.engines.triton import _pb, check_pipeline, read_config

    root, pipe = repository
    with pytest.raises(SlimDiffError, match=r"a StableDiffusionXLImg2ImgPipeline request carries an image already: "
                                            r"leave out --triton-img2img$"):
        check_pipeline(pipe, image_to_image=True)
    repo = root / "repo"
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder_2", "unet", "vae_decoder",
                                                      "vae_encoder"]
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == "StableDiffusionXLImg2ImgPipeline" and spec["image_inputs"] == ["image"]
    assert spec["options"]["requires_aesthetics_score"] is True
    pb, _ = _pb()
    inputs = {t.name: (t.data_type, list(t.dims), t.optional)
              for t in read_config(repo / "pipeline" / "config.pbtxt").input}
    assert inputs["image"] == (pb.TYPE_UINT8, [-1, -1, 3], False)  # a refiner request always carries its image
    assert inputs["strength"] == (pb.TYPE_FP32, [1], True)


def test_served_refiner_is_diffusers_pipeline_with_the_engine(repository):
    """The repository's pipeline (in this process, over the same engines) refines what diffusers' refiner pipeline
    with the UNet engine refines, within one grey level; the image and the strength matter; no image: an error."""
    from slimdiff.errors import SlimDiffError
    from slimdiff.quality.sampling import with_denoiser
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    root, pipe = repository
    served = repository_pipeline(root / "repo" / "pipeline" / "1", local_runners(root / "repo"))
    assert type(served).__name__ == "StableDiffusionXLImg2ImgPipeline" and served.config.requires_aesthetics_score
    reference = with_denoiser(pipe, pipe.unet)
    use_engine(reference, root / "unet")
    options = dict(seed=3, steps=4, image=noise_image(1), strength=0.5)
    got = generate(served, PROMPT, **options)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 1
    assert np.abs(got.astype(int) - generate(reference, PROMPT, **options).astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served, PROMPT, **{**options, "image": noise_image(2)}))
    assert not np.array_equal(got, generate(served, PROMPT, **{**options, "strength": 0.9}))
    with pytest.raises(SlimDiffError, match=r"request takes image, got none$"):
        generate(served, PROMPT, seed=3, steps=4)
