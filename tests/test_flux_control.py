"""FLUX Control (FluxControlPipeline; FLUX.1-Depth-dev's and FLUX.1-Canny-dev's transformer takes the latent and the
control image's latent in each token): told apart by its config, loaded from its own folders (mixed folders refused),
calibrated on the control images given, served by Triton with the control image in the request (and a VAE encoder to
encode it). builtin:tiny-flux-control, seeded weights, CPU. The shared checks (sites, closed forms, save/load, LoRA
maps, engine parity, an image through the engine) are tests/test_conformance.py's TestFluxControl."""

import json

import numpy as np
import pytest
import torch

from slimdiff.calibrate import CalibrationConfig, pipeline_loop
from slimdiff.cli import main
from slimdiff.configs import FLUX_DEV_TRANSFORMER, FLUX_FILL_DEV_TRANSFORMER
from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for, image_generators
from slimdiff.families.flux_control import is_control_transformer
from slimdiff.models import build_builtin, load_pipeline

SIZE = 32


@pytest.fixture(scope="module")
def control():
    return build_builtin("builtin:tiny-flux-control")



def test_control_transformers_are_told_apart_and_mixed_folders_are_refused(control, tmp_path):
    assert is_control_transformer(dict(FLUX_DEV_TRANSFORMER, in_channels=128, out_channels=64))
    assert not is_control_transformer(FLUX_DEV_TRANSFORMER) and not is_control_transformer(FLUX_FILL_DEV_TRANSFORMER)
    assert family_for(control).name == family_for(control.transformer).name == "flux-control"
    control.save_pretrained(tmp_path / "control")
    loaded = load_pipeline(str(tmp_path / "control"))
    assert type(loaded).__name__ == "FluxControlPipeline" and family_for(loaded).name == "flux-control"
    index = json.loads((tmp_path / "control" / "model_index.json").read_text())
    (tmp_path / "control" / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxFillPipeline"}))
    with pytest.raises(SlimDiffError, match=r"is a FluxFillPipeline folder whose transformer takes 128 features per "
                                            r"token: a FLUX Control transformer, not a FLUX Fill transformer"):
        load_pipeline(str(tmp_path / "control"))


def test_calibration_conditions_on_the_images_and_refuses_a_strength(control, noise_images, tmp_path,
                                                                    capsys):
    """The transformer's first input in a calibration batch: the prompt's seeded latent, then its control image's
    latent — of image ``seed mod count`` of the folder, as diffusers' own call on that image with the prompt's
    generator encodes it."""
    from slimdiff.families.images import read_image

    transformer, latent = control.transformer, SIZE // control.vae_scale_factor
    features = transformer.config.out_channels
    seen = []
    hook = transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["hidden_states"]),
                                                 with_kwargs=True)
    prompts, seeds, files = ["a red circle", "two green triangles"], [4, 8], sorted(noise_images.iterdir())

    def diffusers_own(chosen) -> torch.Tensor:
        seen.clear()
        generators = image_generators(seeds)  # each draws its prompt's latent, then the VAE's sample of its image
        latents = family_for(control).seeded_latents(transformer.config, (latent, latent), generators)
        control(prompts, control_image=[read_image(f) for f in chosen], num_inference_steps=2, height=SIZE,
                width=SIZE, generator=generators, output_type="latent", latents=latents)
        return seen[0]

    try:
        config = CalibrationConfig(steps=2, height=SIZE, width=SIZE, images=str(noise_images))
        pipeline_loop(control, config)(prompts, seeds)
        first = seen[0]
        assert first.shape == (2, (latent // 2) ** 2, 2 * features)
        seeded = family_for(control).seeded_latents(transformer.config, (latent, latent), image_generators(seeds))
        assert torch.equal(first[..., :features], seeded)
        assert torch.equal(first, diffusers_own([files[4 % 3], files[8 % 3]]))
        assert not torch.equal(first[..., features:], diffusers_own([files[0], files[0]])[..., features:])
    finally:
        hook.remove()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for flags, message in ((["--strength", "0.5", "--images", str(noise_images)], "noises no image"),
                           ([], "FLUX Control is calibrated on control images")):
        code = main(["calibrate", "--model", "builtin:tiny-flux-control", "--prompts", str(prompts), "--num-prompts",
                     "1", "--steps", "2", "--resolution", str(SIZE), *flags, "--out", str(tmp_path / "stats")])
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[transformers]")]
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "stats").exists()


def test_served_control_is_diffusers_pipeline_with_the_engine(control, tmp_path):
    """The Triton repository (python mode, in this process over its ONNX Runtime engines) serves the VAE encoder (the
    control image's latent) and takes the control image, no strength; it draws what diffusers' FluxControlPipeline
    with the transformer engine draws, within one grey level, and the control image decides what."""
    from serving_support import SIZE as SERVED, noise_image, served_beside_diffusers

    from slimdiff.engines.triton import _pb, read_config
    from slimdiff.runtime.triton_models import generate

    pytest.importorskip("tritonclient.grpc")
    repo, served, reference = served_beside_diffusers(control, tmp_path)
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder", "text_encoder_2", "transformer",
                                                      "vae_decoder", "vae_encoder"]
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == "FluxControlPipeline" and spec["image_inputs"] == ["control_image"]
    pb, _ = _pb()
    inputs = {t.name: (t.data_type, list(t.dims)) for t in read_config(repo / "pipeline" / "config.pbtxt").input}
    assert inputs["control_image"] == (pb.TYPE_UINT8, [-1, -1, 3]) and "strength" not in inputs
    options = dict(seed=3, steps=2, height=SERVED, width=SERVED, control_image=noise_image(1))
    got = generate(served, "a red circle", **options)
    assert got.shape == (SERVED, SERVED, 3) and got.std() > 1
    assert np.abs(got.astype(int) - generate(reference, "a red circle", **options).astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served, "a red circle", **{**options, "control_image": noise_image(2)}))
    with pytest.raises(SlimDiffError, match=r"request takes control_image, got none$"):
        generate(served, "a red circle", **{**options, "control_image": None})
