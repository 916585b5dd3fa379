"""FLUX Kontext (FluxKontextPipeline; FLUX.1-Kontext-dev's transformer has FLUX.1-dev's configuration and is called
with the reference image's tokens after the latent's): a family of its own for the pipeline (the bare transformer
stays flux's), loaded from its own folders (mixed folders refused), calibrated on the images it edits, measured on a
colour ramp or the given images. builtin:tiny-flux-kontext, seeded weights, CPU. The shared checks (sites, closed
forms, save/load, LoRA maps, the engine driving the pipeline) are tests/test_conformance.py's TestFluxKontext."""

import json

import pytest
import torch

from slimdiff.calibrate import CalibrationConfig, pipeline_loop
from slimdiff.cli import main
from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for, family_named, image_generators
from slimdiff.families.flux import latent_ids, pack_latents
from slimdiff.families.images import read_image
from slimdiff.models import build_builtin, load_pipeline

SIZE = 32


@pytest.fixture(scope="module")
def kontext():
    return build_builtin("builtin:tiny-flux-kontext")


def test_kontext_folders_load_as_kontext_pipelines_and_mixed_folders_are_refused(kontext, tmp_path):
    # the pipeline decides: its transformer alone has FLUX.1-dev's configuration
    assert family_for(kontext).name == "flux-kontext" and family_for(kontext.transformer).name == "flux"
    assert family_named("flux-kontext") is family_for(kontext)
    kontext.save_pretrained(tmp_path / "kontext")
    loaded = load_pipeline(str(tmp_path / "kontext"))
    assert type(loaded).__name__ == "FluxKontextPipeline" and family_for(loaded).name == "flux-kontext"
    control = build_builtin("builtin:tiny-flux-control")
    control.save_pretrained(tmp_path / "control")
    index = json.loads((tmp_path / "control" / "model_index.json").read_text())
    (tmp_path / "control" / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    with pytest.raises(SlimDiffError, match=r"is a FluxKontextPipeline folder whose transformer takes 128 features per "
                                            r"token: a FLUX Control transformer, not a text-to-image transformer"):
        load_pipeline(str(tmp_path / "control"))


def test_calibration_appends_the_reference_as_diffusers_does(kontext, noise_images):
    """The transformer's first input in a calibration batch: the prompt's seeded latent, then the tokens of image
    ``seed mod count`` of the folder at the calibration size — what diffusers' own call on that image builds, its
    positions a second grid with first coordinate 1 — and the predictions it keeps are the latent's."""
    from PIL import Image

    transformer, latent = kontext.transformer, SIZE // kontext.vae_scale_factor
    tokens = (latent // 2) ** 2
    seen, outputs = [], []

    def record(module, args, kwargs, output):
        seen.append(kwargs)
        outputs.append(output[0])

    hook = transformer.register_forward_hook(record, with_kwargs=True)
    prompts, seeds, files = ["a red circle", "two green triangles"], [4, 8], sorted(noise_images.iterdir())

    def diffusers_own(chosen) -> dict:
        seen.clear()
        images = [read_image(f).resize((SIZE, SIZE), Image.LANCZOS) for f in chosen]
        latents = family_for(kontext).seeded_latents(transformer.config, (latent, latent), image_generators(seeds))
        kontext(image=images, prompt=prompts, num_inference_steps=2, height=SIZE, width=SIZE, max_area=SIZE**2,
                _auto_resize=False, generator=image_generators(seeds), output_type="latent", latents=latents)
        return seen[0]

    try:
        pipeline_loop(kontext, CalibrationConfig(steps=2, height=SIZE, width=SIZE, images=str(noise_images)))(
            prompts, seeds)
        first, prediction = seen[0], outputs[0]
        hidden = first["hidden_states"]
        assert hidden.shape == (2, 2 * tokens, transformer.config.in_channels)  # the reference doubles the sequence
        seeded = family_for(kontext).seeded_latents(transformer.config, (latent, latent), image_generators(seeds))
        assert torch.equal(hidden[:, :tokens], seeded)
        grid = latent_ids(latent // 2, latent // 2)
        assert torch.equal(first["img_ids"], torch.cat([grid, grid + torch.tensor([1.0, 0, 0])]))
        own = diffusers_own([files[4 % 3], files[8 % 3]])
        assert torch.equal(hidden, own["hidden_states"]) and torch.equal(first["img_ids"], own["img_ids"])
        assert not torch.equal(hidden[:, tokens:], diffusers_own([files[0], files[0]])["hidden_states"][:, tokens:])
        # the reference's tokens are the VAE's mode of the image at the calibration size, packed
        image = kontext.image_processor.preprocess(read_image(files[1]).resize((SIZE, SIZE), Image.LANCZOS))
        assert torch.allclose(hidden[0, tokens:], pack_latents(kontext._encode_vae_image(image, None))[0])
        # the measuring runs' noise error reads the predictions the pipeline keeps: the latent's tokens
        assert prediction.shape[1] == 2 * tokens
        assert torch.equal(family_for(transformer).kept_prediction(first, prediction), prediction[:, :tokens])
    finally:
        hook.remove()


def test_calibration_refuses_a_strength_and_no_images(noise_images, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for flags, message in ((["--strength", "0.5", "--images", str(noise_images)], "noises no image"),
                           ([], "FLUX Kontext is calibrated on the images it edits")):
        code = main(["calibrate", "--model", "builtin:tiny-flux-kontext", "--prompts", str(prompts), "--num-prompts",
                     "1", "--steps", "2", "--resolution", str(SIZE), *flags, "--out", str(tmp_path / "stats")])
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[transformers]")]
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "stats").exists()


def test_measuring_runs_edit_the_colour_ramp_or_the_given_images(kontext, noise_images):
    """``slimdiff eval``'s sampling: the reference is the colour ramp, or image ``seed mod count`` of ``--images``,
    at the image size; its noise error compares the predictions the pipeline keeps, the latent's tokens."""
    from slimdiff.quality.sampling import NoiseErrorProbe, generate

    tokens = (SIZE // kontext.vae_scale_factor // 2) ** 2
    calls = []
    hook = kontext.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True)
    try:
        ramp = generate(kontext, ["a red circle"], [1], steps=1, guidance=3.5, size=SIZE)
        given = generate(kontext, ["a red circle"], [1], steps=1, guidance=3.5, size=SIZE,
                         images=sorted(noise_images.iterdir()))
        assert ramp.shape == given.shape == (1, SIZE, SIZE, 3) and len(calls) == 2
        references = [kwargs["hidden_states"][:, tokens:] for kwargs, _ in calls]
        assert references[0].shape == (1, tokens, 64) and not torch.equal(*references)

        slim = build_builtin("builtin:tiny-flux-kontext").transformer
        with torch.no_grad():
            for p in slim.parameters():
                p.mul_(0.9)
        probe = NoiseErrorProbe(kontext.transformer, {"perturbed": slim})
        calls.clear()
        generate(kontext, ["a red circle"], [1], steps=1, guidance=3.5, size=SIZE, probe=probe)
    finally:
        hook.remove()
    kwargs, dense = calls[0]
    with torch.no_grad():
        perturbed = slim(**kwargs)[0]
    error = lambda n: float((perturbed[:, :n] - dense[:, :n]).norm() / dense[:, :n].norm())  # noqa: E731
    measured = probe.errors()["perturbed"]
    assert measured.shape == (1, 1) and abs(measured[0, 0] - error(tokens)) < 1e-6
    assert abs(error(tokens) - error(2 * tokens)) > 1e-4  # the reference's predictions would change it


def test_bench_times_the_kontext_call_end_to_end():
    """``slimdiff bench`` (eager): the timed calls and the end-to-end runs take the Kontext call — the latent and the
    colour ramp's latent — and the MAC count is that of the blocks over both token sets."""
    from slimdiff.bench.harness import Bench, BenchConfig
    from slimdiff.bench.macs import count_macs, meta_unet

    bench = Bench(BenchConfig(model="builtin:tiny-flux-kontext", engines=["eager"], budgets=[0.0, 0.4], batches=[1],
                              resolution=SIZE, device="cpu", warmup=1, iters=2, e2e_steps=1, e2e_runs=1),
                  log=lambda msg: None)
    bench.prepare()
    assert [spec.name for spec in bench.inputs.specs][:2] == ["hidden_states", "reference_latents"]
    bench.run_engines(["eager"])
    report = bench.report()
    assert report["model"]["family"] == "flux-kontext"
    cells = {(r["engine"], r["budget"]): r for r in report["results"]}
    assert set(cells) == {("eager", 0.0), ("eager", 0.4)} and all(r["status"] == "ok" for r in cells.values())
    assert all(r["e2e"]["images"] == 1 and r["e2e"]["unet_calls"] == 1 for r in cells.values())
    shapes = meta_unet(bench.pipe.transformer)
    text = bench.inputs.text_len
    kontext = count_macs(shapes, 1, (16, 16), text, family_for(bench.pipe)).transformer
    assert report["models"][0]["macs"]["1"]["transformer"] == kontext > count_macs(shapes, 1, (16, 16), text).transformer


def test_mac_and_latency_tables_count_the_reference_tokens(kontext, tmp_path, monkeypatch):
    """``bench --macs-only`` (no weights loaded) and ``bench --latency-table`` call a Kontext model as its pipeline
    does: FLUX.1-dev's transformer configuration alone cannot say so. The latency table records the family, so
    ``slim --speedup`` prices the same sequence (a Kontext table read as FLUX's has no entry for its sites)."""
    from slimdiff.bench import latency_table
    from slimdiff.bench.macs import ideal_table
    from slimdiff.bench.memory import pipeline_family, unet_config
    from slimdiff.latency import LatencyModel

    kontext.save_pretrained(tmp_path / "kontext")
    for source in ("builtin:tiny-flux-kontext", str(tmp_path / "kontext")):
        assert pipeline_family(source, unet_config(source)).name == "flux-kontext"
    config = unet_config("builtin:tiny-flux-kontext")
    assert pipeline_family("builtin:tiny-flux", config).name == "flux"
    # a slim transformer folder alone: the family its plan records, else the transformer's own
    from slimdiff.plan import RankPlan
    from slimdiff.serialization import PLAN_FILE

    slim = tmp_path / "slim-transformer"
    kontext.transformer.save_pretrained(slim)
    for recorded, family in (({"family": "flux-kontext"}, "flux-kontext"), ({}, "flux")):
        (slim / PLAN_FILE).write_text(RankPlan({}, recorded).to_json())
        assert pipeline_family(str(slim), unet_config(str(slim))).name == family
    (flux,), (edit,) = (ideal_table(config, [0.0], [1], (16, 16), family=family_named(name))
                        for name in ("flux", "flux-kontext"))
    assert edit["macs"]["transformer"] > flux["macs"]["transformer"]  # the reference tokens: 64 beside 64 + 512

    monkeypatch.setattr(latency_table, "_time_module", lambda fn, device, warmup, iters: (fn(), 1.0)[1])
    table = latency_table.measure_latency_table(kontext.transformer, (16, 16), 1, max_points=2, warmup=1, iters=1,
                                                family=family_for(kontext))
    assert table["family"] == "flux-kontext"
    LatencyModel(table, kontext.transformer, family=family_for(kontext))  # every site at the Kontext call's tokens
    # the transformer alone is FLUX.1-dev's: a Kontext table does not price its text-to-image call, nor the reverse
    with pytest.raises(SlimDiffError, match="measured on a flux-kontext model's call, not a flux model's"):
        LatencyModel(table, kontext.transformer)
    with pytest.raises(SlimDiffError, match="measured on a flux model's call, not a flux-kontext model's"):
        LatencyModel({**table, "family": "flux"}, kontext.transformer, family=family_for(kontext))
    # slimming records the family calling the denoiser in the plan (what an export of the slim folder reads)
    from slimdiff.slim import SlimConfig, check_budget

    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    with pytest.raises(SlimDiffError, match="not a flux model's"):
        check_budget(kontext.transformer, SlimConfig(speedup=1.01, latency_table=str(path)))


def test_the_reference_axes_reach_every_shape_table(kontext):
    """The exported call's reference axes are axes of their own (their own torch.export symbols) with the ranges of
    the latent's flags, in the ONNX / ONNX Runtime / AOTInductor axis table and TensorRT's optimisation profiles."""
    from slimdiff.engines.trt import optimization_profiles
    from slimdiff.export.modules import component_axes, denoiser_component, torch_dynamic_shapes
    from slimdiff.export.shapes import parse_profiles, union

    component = denoiser_component(kontext.transformer, family=family_for(kontext))
    assert [s.name for s in component.inputs][:2] == ["hidden_states", "reference_latents"]
    assert len(denoiser_component(kontext.transformer).inputs) == len(component.inputs) - 1  # the bare transformer's
    profiles = parse_profiles("1:2:2", "16:32:48", "32", "512", vae_scale=2, multiple=8)
    axes = component_axes(component, union(profiles), {"height": 8, "width": 8})
    assert axes["reference_height"] == axes["height"] == {"min": 8, "opt": 16, "max": 24, "multiple": 8}
    assert axes["reference_width"] == axes["width"]
    (latent, reference, *_), = torch_dynamic_shapes(component, axes)
    assert str(reference[2]) != str(latent[2]) and "reference_height" in str(reference[2])
    sidecar = {"axes": axes, "profiles": [p.to_json() for p in profiles],
               "input_axes": {s.name: list(s.dims) for s in component.inputs}}
    trt, = optimization_profiles(sidecar)
    assert trt["reference_latents"] == ((1, 16, 8, 16), (2, 16, 16, 16), (2, 16, 24, 16))


def test_served_kontext_is_diffusers_pipeline_with_the_engine(kontext, tmp_path):
    """The Triton repository (python mode, in this process over its ONNX Runtime engines) serves the VAE encoder (the
    reference's latent) and takes the image to edit, no strength; it draws what diffusers' FluxKontextPipeline with
    the transformer engine draws at the request's size, within one grey level, and the image decides what."""
    import numpy as np
    from serving_support import SIZE as SERVED, noise_image, served_beside_diffusers

    from slimdiff.engines.triton import _pb, read_config
    from slimdiff.runtime.triton_models import generate

    pytest.importorskip("tritonclient.grpc")
    repo, served, reference = served_beside_diffusers(kontext, tmp_path)
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder", "text_encoder_2", "transformer",
                                                      "vae_decoder", "vae_encoder"]
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == "FluxKontextPipeline" and spec["image_inputs"] == ["image"]
    pb, _ = _pb()
    inputs = {t.name: (t.data_type, list(t.dims)) for t in read_config(repo / "pipeline" / "config.pbtxt").input}
    assert inputs["image"] == (pb.TYPE_UINT8, [-1, -1, 3]) and "strength" not in inputs
    options = dict(seed=3, steps=2, image=noise_image(1))
    got = generate(served, "a red circle", **options)
    assert got.shape == (SERVED, SERVED, 3) and got.std() > 1  # the image's size, not the pipeline's 1 MP
    assert np.abs(got.astype(int) - generate(reference, "a red circle", **options).astype(int)).max() <= 1
    assert not np.array_equal(got, generate(served, "a red circle", **{**options, "image": noise_image(2)}))
    with pytest.raises(SlimDiffError, match=r"request takes image, got none$"):
        generate(served, "a red circle", **{**options, "image": None})
    with pytest.raises(SlimDiffError, match=r"request takes no strength$"):
        generate(served, "a red circle", **options, strength=0.5)


def test_the_export_takes_the_call_from_the_pipeline_or_the_slim_plan(kontext):
    """``slimdiff-export`` exports the Kontext call from a Kontext pipeline, or from a slim folder alone by the family
    its plan records; a transformer that says nothing exports FLUX's text-to-image call."""
    from types import SimpleNamespace

    from slimdiff.cli.export import _family

    transformer = kontext.transformer
    assert _family(kontext, transformer, None).name == "flux-kontext"
    assert _family(None, transformer, SimpleNamespace(info={"family": "flux-kontext"})).name == "flux-kontext"
    assert _family(None, transformer, SimpleNamespace(info={})).name == "flux"
    with pytest.raises(SlimDiffError, match="no model family named 'kontext'"):
        _family(None, transformer, SimpleNamespace(info={"family": "kontext"}))
