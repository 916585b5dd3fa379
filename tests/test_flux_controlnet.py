"""FLUX ControlNets (FluxControlNetPipeline around FLUX.1's transformer and a FluxControlNetModel): the pipeline is its
own family (its transformer alone stays ``flux``), calibrated on the control images given; a slim transformer runs
in it from a slim folder; the refusals. builtin:tiny-flux-controlnet, seeded weights, CPU."""

import json
import shutil

import pytest
import torch

from slimdiff.calibrate import CalibrationConfig, pipeline_loop
from slimdiff.cli import main
from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for, image_generators
from slimdiff.models import build_builtin, load_pipeline

SIZE = 32
PROMPTS = ["a red circle", "two green triangles"]


@pytest.fixture(scope="module")
def pipe():
    return build_builtin("builtin:tiny-flux-controlnet")


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("flux-controlnet") / "pipe"
    pipe.save_pretrained(path)
    return path


def one_error_line(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[transformers]")]


def first_transformer_call(pipe, run) -> dict:
    """The keyword arguments of the transformer's first call while ``run()`` samples."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs),
                                                      with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


def test_family_and_folders(pipe, folder, tmp_path):
    assert family_for(pipe).name == "flux-controlnet" and family_for(pipe.transformer).name == "flux"
    loaded = load_pipeline(str(folder))
    assert type(loaded).__name__ == "FluxControlNetPipeline" and family_for(loaded).name == "flux-controlnet"
    incomplete = tmp_path / "incomplete"
    shutil.copytree(folder, incomplete)
    shutil.rmtree(incomplete / "controlnet")
    with pytest.raises(SlimDiffError, match=r"FluxControlNetPipeline folder without controlnet"):
        load_pipeline(str(incomplete))


def test_calibration_is_diffusers_own_call_on_the_images(pipe, noise_images):
    """The transformer's first call in a calibration batch — the prompt's seeded latent and the ControlNet's samples
    of image ``seed mod count`` — equals diffusers' own call on those images with the prompts' generators; another
    image gives other samples."""
    from slimdiff.families.images import read_image

    seeds, files = [4, 8], sorted(noise_images.iterdir())
    latent = SIZE // pipe.vae_scale_factor
    family = family_for(pipe)

    def diffusers_own(chosen):
        generators = image_generators(seeds)
        latents = family.seeded_latents(pipe.transformer.config, (latent, latent), generators)
        return first_transformer_call(pipe, lambda: pipe(
            PROMPTS, control_image=[read_image(f) for f in chosen], num_inference_steps=2, height=SIZE, width=SIZE,
            generator=generators, output_type="latent", latents=latents))

    config = CalibrationConfig(steps=2, height=SIZE, width=SIZE, images=str(noise_images))
    ours = first_transformer_call(pipe, lambda: pipeline_loop(pipe, config)(PROMPTS, seeds))
    theirs = diffusers_own([files[4 % 3], files[8 % 3]])
    seeded = family.seeded_latents(pipe.transformer.config, (latent, latent), image_generators(seeds))
    assert torch.equal(ours["hidden_states"], seeded) and torch.equal(theirs["hidden_states"], seeded)
    samples = ("controlnet_block_samples", "controlnet_single_block_samples")
    for name in samples:
        assert len(ours[name]) == 1 and all(torch.equal(a, b) for a, b in zip(ours[name], theirs[name]))
    other = diffusers_own([files[0], files[0]])
    assert not torch.equal(ours[samples[0]][0], other[samples[0]][0])


def test_slim_folder_draws_the_in_memory_image(pipe, noise_images, tmp_path):
    """`slimdiff slim` on the pipeline: the plan records the family, and the slim folder loads as the ControlNet
    pipeline (plain diffusers too, from a saved slim pipeline) drawing the in-memory slim pipeline's image."""
    from diffusers import DiffusionPipeline

    from slimdiff import SlimFluxTransformer2DModel
    from slimdiff.api import slim_pipeline
    from slimdiff.families.images import colour_ramp
    from slimdiff.serialization import load_plan, save_slim_pipeline
    from slimdiff.slim import SlimConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main(["slim", "--model", "builtin:tiny-flux-controlnet", "--prompts", str(prompts), "--num-prompts", "2",
                 "--steps", "2", "--resolution", str(SIZE), "--images", str(noise_images), "--budget", "0.4",
                 "--out", str(tmp_path / "slim")]) == 0
    assert load_plan(tmp_path / "slim").info["family"] == "flux-controlnet"
    loaded = load_pipeline(str(tmp_path / "slim"))
    assert type(loaded).__name__ == "FluxControlNetPipeline"
    assert isinstance(loaded.transformer, SlimFluxTransformer2DModel)

    in_memory = build_builtin("builtin:tiny-flux-controlnet")
    report = slim_pipeline(in_memory, SlimConfig(budget=0.4), prompts=PROMPTS, num_prompts=2, progress=False,
                           calibration=CalibrationConfig(steps=2, height=SIZE, width=SIZE, images=str(noise_images)))
    save_slim_pipeline(in_memory, report.plan, tmp_path / "pipe")
    native = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(native).__name__ == "FluxControlNetPipeline"
    native.set_progress_bar_config(disable=True)

    def draw(p):
        return p(prompt=PROMPTS[:1], control_image=colour_ramp(), num_inference_steps=2, height=SIZE, width=SIZE,
                 generator=torch.Generator().manual_seed(0), output_type="np").images

    image = draw(in_memory)
    assert image.std() > 0 and (draw(native) == image).all() and (draw(loaded) == image).all()
    assert not (draw(pipe) == image).all()  # the dense transformer draws another image


def test_calibration_refusals(pipe, folder, noise_images, tmp_path, capsys):
    """No control images, a Union ControlNet, several ControlNets: one line, exit 2, nothing written."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel

    union = tmp_path / "union"
    shutil.copytree(folder, union)
    config = json.loads((union / "controlnet" / "config.json").read_text())
    FluxControlNetModel.from_config({**config, "num_mode": 3}).save_pretrained(union / "controlnet")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for model, flags, message in (
            ("builtin:tiny-flux-controlnet", [], "a FLUX ControlNet pipeline is calibrated on control images"),
            (str(union), ["--images", str(noise_images)], "with a ControlNet-Union model (num_mode 3)")):
        code = main(["calibrate", "--model", model, "--prompts", str(prompts), "--num-prompts", "1", "--steps", "2",
                     "--resolution", str(SIZE), *flags, "--out", str(tmp_path / "stats")])
        err = one_error_line(capsys)
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "stats").exists()
    multi = FluxControlNetPipeline(**{**pipe.components,
                                      "controlnet": FluxMultiControlNetModel([pipe.controlnet, pipe.controlnet])})
    with pytest.raises(SlimDiffError, match=r"with 2 ControlNets \(FluxMultiControlNetModel\): calibrate with one"):
        pipeline_loop(multi, CalibrationConfig(steps=2, height=SIZE, width=SIZE, images=str(noise_images)))
