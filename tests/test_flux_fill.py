"""FLUX Fill (FluxFillPipeline; FLUX.1-Fill-dev's transformer takes the latent, the masked image's latent and the mask
in each token): told apart from text-to-image FLUX by its config, loaded from its own folders (mixed folders refused),
calibrated on images with seeded holes, served by Triton with the image and the mask in the request. builtin:tiny-
flux-fill, seeded weights, CPU. The shared checks (sites, closed forms, save/load, LoRA maps, engine parity, an image
through the engine) are tests/test_conformance.py's TestFluxFill."""

import json

import numpy as np
import pytest
import torch

from slimdiff.calibrate import CalibrationConfig
from slimdiff.cli import main
from slimdiff.configs import FLUX_DEV_TRANSFORMER, FLUX_FILL_DEV_TRANSFORMER, TINY_FLUX_FILL_TRANSFORMER
from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for, image_generators
from slimdiff.families.flux import pack_latents
from slimdiff.families.flux_fill import fill_loop, is_fill_transformer
from slimdiff.families.images import read_image
from slimdiff.families.inpaint import seeded_hole
from slimdiff.models import build_builtin, load_pipeline

SIZE = 32
FAST = ["--num-prompts", "2", "--steps", "2", "--pass1-prompts", "1", "--resolution", str(SIZE)]


@pytest.fixture(scope="module")
def fill():
    return build_builtin("builtin:tiny-flux-fill")



def test_fill_transformers_are_told_apart_by_their_input(fill):
    assert is_fill_transformer(FLUX_FILL_DEV_TRANSFORMER) and is_fill_transformer(TINY_FLUX_FILL_TRANSFORMER)
    assert not is_fill_transformer(FLUX_DEV_TRANSFORMER)
    assert not is_fill_transformer(dict(FLUX_DEV_TRANSFORMER, in_channels=128, out_channels=64))  # FLUX Control's
    assert family_for(fill).name == family_for(fill.transformer).name == "flux-fill"
    shape = build_builtin("builtin:flux-fill-shape", device="meta")
    assert family_for(shape).name == "flux-fill" and shape.transformer.x_embedder.in_features == 384
    flux = build_builtin("builtin:tiny-flux", device="meta")
    assert family_for(flux.transformer).name == "flux"
    # a text-to-image pipeline around a Fill transformer has no family: its sampler makes no masked-image tokens
    with pytest.raises(SlimDiffError, match="no model family for FluxPipeline"):
        family_for(type(flux)(**{**flux.components, "transformer": fill.transformer}))


def _index_class(folder, name: str) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))


def test_fill_folders_load_as_fill_pipelines_and_mixed_folders_are_refused(fill, tmp_path):
    fill.save_pretrained(tmp_path / "fill")
    loaded = load_pipeline(str(tmp_path / "fill"))
    assert type(loaded).__name__ == "FluxFillPipeline" and family_for(loaded).name == "flux-fill"
    _index_class(tmp_path / "fill", "FluxPipeline")  # a text-to-image index over a Fill transformer
    with pytest.raises(SlimDiffError, match=r"is a FluxPipeline folder whose transformer takes 144 features per token: "
                                            r"a FLUX Fill transformer, not a text-to-image transformer; the folder"):
        load_pipeline(str(tmp_path / "fill"))
    _index_class(tmp_path / "fill", "FluxKontextPipeline")  # Kontext's tokens carry the latent alone
    with pytest.raises(SlimDiffError, match=r"is a FluxKontextPipeline folder whose transformer takes 144 features per "
                                            r"token: a FLUX Fill transformer, not a text-to-image transformer"):
        load_pipeline(str(tmp_path / "fill"))
    flux = build_builtin("builtin:tiny-flux")
    flux.save_pretrained(tmp_path / "flux")
    _index_class(tmp_path / "flux", "FluxFillPipeline")  # a Fill index over a text-to-image transformer
    with pytest.raises(SlimDiffError, match="FluxFillPipeline folder whose transformer takes 64 features per token: a "
                                            "text-to-image transformer, not a FLUX Fill transformer"):
        load_pipeline(str(tmp_path / "flux"))


def test_calibration_without_images_is_refused_before_sampling(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo green triangles\n")
    code = main(["calibrate", "--model", "builtin:tiny-flux-fill", "--prompts", str(prompts), *FAST,
                 "--out", str(tmp_path / "stats")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[transformers]")]
    assert code == 2 and len(err) == 1 and "FLUX Fill is calibrated on images with holes" in err[-1], err
    assert not (tmp_path / "stats").exists()


def test_calibration_fills_seeded_holes_in_the_images(fill, noise_images):
    """The transformer's first input in a calibration batch: the seeded latent (at strength 1), then the masked
    image's latent, then the mask of the prompt's seeded hole; below strength 1, what diffusers' own call draws
    from the image noised by the prompt's generator."""
    transformer, latent = fill.transformer, SIZE // fill.vae_scale_factor
    features = transformer.config.out_channels
    seen = []
    hook = transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["hidden_states"]),
                                                 with_kwargs=True)
    try:
        config = CalibrationConfig(steps=2, height=SIZE, width=SIZE, images=str(noise_images))
        fill_loop(family_for(fill), fill, config)(["a red circle", "two green triangles"], [4, 7])
        first = seen[0]
        assert first.shape == (2, (latent // 2) ** 2, transformer.config.in_channels)
        seeded = family_for(fill).seeded_latents(transformer.config, (latent, latent), image_generators([4, 7]))
        assert torch.equal(first[..., :features], seeded)
        for row, seed in enumerate((4, 7)):
            hole = torch.from_numpy(np.asarray(seeded_hole(seed, SIZE, SIZE)) > 0).float()
            # the mask's pixels, folded onto the latent grid as channels and packed: the pipeline's own layout
            folded = hole.view(latent, fill.vae_scale_factor, latent, fill.vae_scale_factor).permute(1, 3, 0, 2)
            expected = pack_latents(folded.reshape(1, -1, latent, latent))
            assert torch.equal(first[row:row + 1, :, 2 * features:], expected)
            assert 0.09 <= hole.mean() <= 0.64  # a hole of 9-64 % of the image
        assert not torch.equal(first[0, :, features:2 * features], first[1, :, features:2 * features])

        seen.clear()
        half = CalibrationConfig(steps=4, height=SIZE, width=SIZE, images=str(noise_images), strength=0.5)
        fill_loop(family_for(fill), fill, half)(["a red circle"], [4])
        calibrating = seen[0]
        seen.clear()
        files = sorted(noise_images.iterdir())
        fill(["a red circle"], image=[read_image(files[4 % 3])], mask_image=[seeded_hole(4, SIZE, SIZE)],
             num_inference_steps=4, height=SIZE, width=SIZE, strength=0.5, generator=image_generators([4]),
             output_type="latent")
        assert torch.equal(calibrating, seen[0]) and len(seen) == 2  # int(4 × 0.5) steps, one call each
    finally:
        hook.remove()


def test_served_fill_is_diffusers_pipeline_with_the_engine(fill, tmp_path):
    """The Triton repository (python mode, in this process over its ONNX Runtime engines) serves the VAE encoder
    beside the decoder and takes the image and the mask; it fills what diffusers' FluxFillPipeline with the
    transformer engine fills, within one grey level, and the mask decides where."""
    from serving_support import SIZE as SERVED, noise_image, served_beside_diffusers

    from slimdiff.runtime.triton_models import generate

    pytest.importorskip("tritonclient.grpc")
    repo, served, reference = served_beside_diffusers(fill, tmp_path)
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder", "text_encoder_2", "transformer",
                                                      "vae_decoder", "vae_encoder"]
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == "FluxFillPipeline" and spec["image_inputs"] == ["image", "mask_image"]
    mask = np.zeros((SERVED, SERVED), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    options = dict(seed=3, steps=2, height=SERVED, width=SERVED, image=noise_image(1), mask_image=mask)
    got = generate(served, "a red circle", **options)
    assert got.shape == (SERVED, SERVED, 3) and got.std() > 1
    assert np.abs(got.astype(int) - generate(reference, "a red circle", **options).astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served, "a red circle", **{**options, "mask_image": 255 - mask}))
    with pytest.raises(SlimDiffError, match=r"request takes image and mask_image, got image$"):
        generate(served, "a red circle", **{**options, "mask_image": None})
