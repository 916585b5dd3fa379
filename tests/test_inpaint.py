"""Inpainting models (a UNet taking the latent, the mask and the masked image's latent: 9 input channels): loaded
with their inpainting pipeline, calibrated on images with seeded holes (``--images``), slimmed, run as an ONNX
Runtime engine in the inpainting pipeline; SDXL's inpainting UNet calibrates the same way. Tiny seeded models."""

import numpy as np
import pytest
import torch
from export_support import TWO_LEVEL_UNET
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from PIL import Image

from slimdiff.calibrate import CalibrationConfig, calibrate
from slimdiff.cli import main
from slimdiff.configs import TINY_XL_UNET
from slimdiff.families import family_for
from slimdiff.families.inpaint import HOLE_SIDE, seeded_hole
from slimdiff.models import _seeded, build_builtin, load_pipeline

FAST = ["--num-prompts", "3", "--steps", "2", "--pass1-prompts", "1"]
SIZE = 32


def _inpainting(base: str, unet_config: dict, cls):
    pipe = build_builtin(base)
    unet = _seeded(5, lambda: UNet2DConditionModel(**dict(unet_config, in_channels=9)))
    return cls(**{**pipe.components, "unet": unet.eval().requires_grad_(False)})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """``(root, images)``: an SD inpainting pipeline folder ``root/model`` and three photographs-to-be."""
    root = tmp_path_factory.mktemp("inpaint")
    # tiny's blocks at two levels: the engine build's export time follows the graph's size
    _inpainting("builtin:tiny", TWO_LEVEL_UNET, StableDiffusionInpaintPipeline).save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    for i in range(3):  # sizes unlike the calibration size: the pipeline resizes
        pixels = np.random.default_rng(i).integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    return root, images


def test_holes_are_seeded_rectangles_of_the_stated_size():
    masks = [np.asarray(seeded_hole(seed, 40, 64)) > 0 for seed in range(12)]
    assert np.array_equal(masks[3], np.asarray(seeded_hole(3, 40, 64)) > 0)
    low, high = HOLE_SIDE
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one solid rectangle
        assert low * 40 - 1 <= len(rows) <= high * 40 + 1 and low * 64 - 1 <= len(cols) <= high * 64 + 1
    assert len({m.tobytes() for m in masks}) == len(masks)


def test_calibration_without_images_is_refused_before_sampling(inputs, tmp_path, capsys):
    root, _ = inputs
    code = main(["calibrate", "--model", str(root / "model"), *FAST, "--out", str(tmp_path / "stats")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[transformers]")]
    assert code == 2 and len(err) == 1 and "give a folder of images (`--images DIR`" in err[0], err
    assert not (tmp_path / "stats").exists()
    code = main(["calibrate", "--model", str(root / "model"), "--images", str(root / "model"), *FAST,
                 "--out", str(tmp_path / "stats")])
    assert code == 2 and "holds no .png" in capsys.readouterr().err
    # an image that cannot be read is named before calibration starts, not when its prompt comes up
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (40, 90, 200)).save(images / name)
    (images / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code = main(["calibrate", "--model", str(root / "model"), "--images", str(images), *FAST,
                 "--out", str(tmp_path / "stats")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"slimdiff: error: calibration image '{images / 'c.jpg'}' cannot be read")
    assert not (tmp_path / "stats").exists()


def test_an_inpainting_model_calibrates_slims_and_runs_as_an_engine(inputs, tmp_path):
    from slimdiff.engines.build import build_denoiser_engine
    from slimdiff.engines.triton import check_pipeline
    from slimdiff.export.shapes import parse_profiles
    from slimdiff.quality.sampling import generate
    from slimdiff.runtime import EngineUNet, use_engine

    root, images = inputs
    stats, slim = tmp_path / "stats", tmp_path / "slim"
    assert main(["calibrate", "--model", str(root / "model"), "--images", str(images), *FAST,
                 "--resolution", str(SIZE), "--out", str(stats)]) == 0
    assert main(["slim", "--model", str(root / "model"), "--stats", str(stats), "--budget", "0.3",
                 "--out", str(slim)]) == 0
    pipe = load_pipeline(str(slim))  # the slim folder reopens the inpainting pipeline around its slim UNet
    assert type(pipe) is StableDiffusionInpaintPipeline and pipe.unet.config.in_channels == 9
    family = family_for(pipe)
    assert family.name == "sd-inpaint" and pipe.unet.slim_plan.params_removed > 0
    # served with the image and the mask in the request (tests/test_triton_inpaint.py)
    assert check_pipeline(pipe).image_inputs == ("image", "mask_image")

    # the measuring task (a grey canvas with a centred hole) through PyTorch, then through the engine
    def draw():
        return generate(pipe, ["a red circle", "a blue square"], [0, 1], steps=2, guidance=5.0, size=SIZE)

    reference = draw()
    profiles = parse_profiles(batch="4", height=str(SIZE), width=str(SIZE), text_len="77", vae_scale=2, multiple=8)
    build_denoiser_engine(pipe.unet, "ort", tmp_path, profiles=profiles, dtype=torch.float32, device="cpu", multiple=8,
                          plan=pipe.unet.slim_plan)
    assert isinstance(use_engine(pipe, tmp_path), EngineUNet)
    image = draw()
    assert image.shape == reference.shape == (2, SIZE, SIZE, 3) and np.abs(image - reference).max() < 1e-3
    assert np.abs(reference - reference.mean()).max() > 1e-3  # not a flat image: the comparison has content


def test_evaluation_starts_from_the_images_given(inputs):
    """What ``slimdiff eval --images`` samples: image i inpaints ``images[seed mod count]`` with calibration's seeded
    hole, not the synthetic canvas; the same files draw the same images, other files other images."""
    from slimdiff.quality.sampling import generate

    root, images = inputs
    pipe = load_pipeline(str(root / "model"))
    files = sorted(images.iterdir())
    kw = dict(steps=2, guidance=7.5, size=SIZE, batch_size=1)  # one image per call: several chunks
    prompts = ["a red circle", "a blue square"]
    given = generate(pipe, prompts, [0, 1], images=files, **kw)
    assert np.array_equal(given, generate(pipe, prompts, [0, 1], images=files, **kw))
    assert not np.array_equal(given, generate(pipe, prompts, [0, 1], **kw))
    assert not np.array_equal(given, generate(pipe, prompts, [0, 1], images=files[::-1], **kw))


def test_sdxl_inpainting_calibrates_on_its_own_pipeline(inputs):
    _, images = inputs
    pipe = _inpainting("builtin:tiny-xl", TINY_XL_UNET, StableDiffusionXLInpaintPipeline)
    assert family_for(pipe).name == "sdxl-inpaint" and family_for(pipe.unet).name == "sdxl-inpaint"
    config = CalibrationConfig(steps=2, pass1_prompts=1, height=SIZE, width=SIZE, images=str(images))
    stats = calibrate(pipe, ["a red circle", "two green triangles"], None, config, progress=False)
    stats.check_model(pipe.unet)
    assert stats.num_prompts == 2 and len(stats.timesteps) == 2


def test_below_full_strength_sampling_starts_from_the_noised_image(inputs):
    """At a strength below 1 the pipeline must start from the image noised to that strength: diffusers' inpainting
    pipelines take given ``latents`` as the start whatever the strength, so calibration and evaluation pass none
    then, and their first UNet input is the one diffusers' own call draws with the same generators."""
    from slimdiff.families import image_generators
    from slimdiff.families.images import read_image
    from slimdiff.families.inpaint import inpainting_loop
    from slimdiff.quality.sampling import generate

    root, images = inputs
    pipe = load_pipeline(str(root / "model"))
    files = sorted(images.iterdir())
    inputs_seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: inputs_seen.append(args[0].clone()))

    def first_input(run) -> torch.Tensor:
        inputs_seen.clear()
        run()
        return inputs_seen[0]

    def diffusers_own(size: int, mask, guidance: float) -> torch.Tensor:
        return first_input(lambda: pipe(["a red circle"], image=[read_image(files[4 % len(files)])], mask_image=[mask],
                                        num_inference_steps=4, guidance_scale=guidance, height=size, width=size,
                                        strength=0.5, generator=image_generators([4]), output_type="latent"))

    config = CalibrationConfig(steps=4, height=SIZE, width=SIZE, images=str(images), strength=0.5)
    calibrating = first_input(lambda: inpainting_loop(pipe, config)(["a red circle"], [4]))
    assert torch.equal(calibrating, diffusers_own(SIZE, seeded_hole(4, SIZE, SIZE), 7.5))
    evaluating = first_input(lambda: generate(pipe, ["a red circle"], [4], steps=4, guidance=5.0, size=SIZE,
                                              images=files, strength=0.5))
    assert torch.equal(evaluating, diffusers_own(SIZE, seeded_hole(4, SIZE, SIZE), 5.0))
