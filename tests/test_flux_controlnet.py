"""FLUX ControlNets (FluxControlNetPipeline around FLUX.1's transformer and a FluxControlNetModel): the pipeline is its
own family (its transformer alone stays ``flux``), calibrated on the control images given; a slim transformer runs
in it from a slim folder; its engines (the transformer's taking the ControlNet's samples, the ControlNet's) run in it
and are served by a Triton repository whose requests carry the control image; the refusals.
builtin:tiny-flux-controlnet, seeded weights, CPU."""

import json
import shutil

import pytest
import torch
from loaded_images import assert_draws_alike

from slimdiff.calibrate import CalibrationConfig, pipeline_loop
from slimdiff.cli import main
from slimdiff.errors import SlimDiffError
from slimdiff.families import family_for, image_generators
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.quality.sampling import generate

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


@pytest.fixture(scope="module")
def union_controlnet(pipe, tmp_path_factory):
    """A ControlNet-Union model's folder (three control modes) of the pipeline's ControlNet configuration."""
    from diffusers import FluxControlNetModel

    path = tmp_path_factory.mktemp("flux-controlnet-union") / "controlnet"
    config = {k: v for k, v in pipe.controlnet.config.items() if not k.startswith("_")}  # not its defaults' record
    FluxControlNetModel.from_config({**config, "num_mode": 3}).save_pretrained(path)
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
    assert image.std() > 0
    assert_draws_alike(draw(native), image)
    assert_draws_alike(draw(loaded), image)
    assert not (draw(pipe) == image).all()  # the dense transformer draws another image


def test_calibration_refusals(pipe, folder, union_controlnet, noise_images, tmp_path, capsys):
    """No control images, a Union ControlNet, several ControlNets: one line, exit 2, nothing written."""
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

    union = tmp_path / "union"
    shutil.copytree(folder, union)
    shutil.rmtree(union / "controlnet")
    shutil.copytree(union_controlnet, union / "controlnet")
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
    with pytest.raises(SlimDiffError, match=r"with 2 ControlNets \(FluxMultiControlNetModel\): calibrate, measure "
                                            r"and time with one"):
        pipeline_loop(multi, CalibrationConfig(steps=2, height=SIZE, width=SIZE, images=str(noise_images)))
    # what eval draws and bench times runs the pipeline's sampling too: the same line, not diffusers' own error
    union_pipe = load_pipeline(str(union))
    for refused in (lambda: family_for(union_pipe).calling(union_pipe),
                    lambda: generate(union_pipe, ["a red circle"], [0], steps=2, guidance=3.5, size=SIZE)):
        with pytest.raises(SlimDiffError, match=r"with a ControlNet-Union model \(num_mode 3\): slimdiff cannot say"):
            refused()


# -- transformer engines taking the ControlNet's samples (slimdiff-export --controlnet-inputs) ----------------------


@pytest.mark.parametrize("layout", [(1, 1, False), (2, 0, True), (3, 2, False)])
def test_exported_call_adds_the_samples_as_diffusers_forward(pipe, layout):
    """The exported call (what the graph computes) with a ControlNet's samples on the packed grid equals the
    transformer's own call with them as token sequences: fewer samples than blocks (each after a run of blocks),
    XLabs' repeated ones, more samples than blocks."""
    from slimdiff.families.flux import ControlNetSamples, pack_latents

    samples = ControlNetSamples(*layout)
    family = family_for(pipe).with_export_options([samples.option])
    transformer, latent = pipe.transformer, SIZE // pipe.vae_scale_factor
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 16, latent, latent, generator=gen), torch.rand(2, generator=gen),
              torch.randn(2, 7, 96, generator=gen), torch.randn(2, 64, generator=gen), torch.full((2,), 3.5),
              *(torch.randn(2, latent // 2, latent // 2, width, generator=gen) for _ in samples.names)]
    assert [i.name for i in family.export_inputs(transformer.config)][5:] == samples.names
    got = family.export_call(transformer, *inputs)
    call = family.dummy_call(transformer.config, 2, (latent, latent), 7)
    tokens = [s.reshape(2, -1, width) for s in inputs[5:]]
    want = transformer(**{**call, "hidden_states": pack_latents(inputs[0]), "timestep": inputs[1],
                          "encoder_hidden_states": inputs[2], "pooled_projections": inputs[3], "guidance": inputs[4]},
                       controlnet_block_samples=tokens[:layout[0]] or None,
                       controlnet_single_block_samples=tokens[layout[0]:] or None,
                       controlnet_blocks_repeat=layout[2], return_dict=False)[0]
    plain = family_for(pipe.transformer).export_call(transformer, *inputs[:5])
    assert torch.allclose(pack_latents(got), want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)


@pytest.fixture(scope="module")
def exported(folder, noise_images, tmp_path_factory):
    """`slimdiff-export --controlnet DIR --triton-repo` (--controlnet implying --controlnet-inputs) of the pipeline
    with its own ControlNet's folder (calibrated and slimmed on the control images; the slim transformer's engine and
    the ControlNet's, and the python-mode repository serving them beside ``engines``): the output folder."""
    out = tmp_path_factory.mktemp("flux-controlnet-export") / "engines"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    from slimdiff.cli.export import main as export

    assert export(["--model", "builtin:tiny-flux-controlnet", "--engine", "ort", "--slim-only",
                   "--controlnet", str(folder / "controlnet"),
                   "--triton-repo", str(out.parent / "repo"), "--triton-mode", "python",
                   "--height", str(SIZE), "--width", str(SIZE), "--batch", "1", "--images", str(noise_images),
                   "--prompts", str(prompts), "--num-prompts", "2", "--steps", "2", "--out", str(out)]) == 0
    return out


def draw(p, **options):
    from slimdiff.families.images import colour_ramp

    if type(p).__name__ == "FluxControlNetPipeline":
        options = {"control_image": colour_ramp(), **options}
    return p(prompt=PROMPTS[:1], num_inference_steps=2, height=SIZE, width=SIZE,
             generator=torch.Generator().manual_seed(0), output_type="np", **options).images


def test_engines_in_the_pipeline(exported):
    """The export's own checks passed (its table); the slim transformer's engine in FluxControlNetPipeline draws the
    slim PyTorch transformer's image within 1e-3, where the ControlNet moves the image, and so does it with the
    ControlNet's engine too, also at conditioning scale 0.5; without ControlNet (a FluxPipeline) the transformer engine
    adds zeros and draws the slim transformer's text-to-image image."""
    from diffusers import FluxPipeline

    from slimdiff.runtime import EngineFluxTransformer, use_engine
    from slimdiff.runtime.controlnet import EngineFluxControlNet

    meta = json.loads((exported / "slim" / "transformer.engine.json").read_text())
    assert meta["export_options"] == ["controlnet-samples:1:1"] and meta["family"] == "flux-controlnet"
    assert [i["name"] for i in meta["inputs"]][-2:] == ["controlnet_block_sample_0", "controlnet_single_block_sample_0"]
    rows = json.loads((exported / "export.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["slim", "controlnet"] and all(r["max_rel_error"] <= 1e-4 for r in rows)
    slim = load_pipeline(str(exported / "slim-unet"))
    reference, half = draw(slim), draw(slim, controlnet_conditioning_scale=0.5)
    assert abs(reference - draw(slim, controlnet_conditioning_scale=0.0)).max() > 0.05
    assert abs(reference - half).max() > 0.01
    text_to_image = FluxPipeline(**{k: v for k, v in slim.components.items() if k != "controlnet"})
    text_to_image.set_progress_bar_config(disable=True)
    plain = draw(text_to_image)
    use_engine(slim, exported / "slim")
    assert isinstance(slim.transformer, EngineFluxTransformer)
    assert abs(draw(slim) - reference).max() < 1e-3
    use_engine(slim, exported / "controlnet")
    assert isinstance(slim.controlnet, EngineFluxControlNet)
    assert abs(draw(slim) - reference).max() < 1e-3
    assert abs(draw(slim, controlnet_conditioning_scale=0.5) - half).max() < 1e-3
    text_to_image.transformer = slim.transformer
    assert abs(draw(text_to_image) - plain).max() < 1e-3


def test_engine_refusals(pipe, exported, tmp_path):
    """An engine built without sample inputs refuses samples; samples of another ControlNet's layout or shape are
    refused; one line each."""
    from slimdiff.engines.build import build_denoiser_engine
    from slimdiff.export.shapes import parse_profiles
    from slimdiff.runtime import EngineFluxTransformer

    engine = EngineFluxTransformer.from_folder(exported / "slim")
    latent, width = SIZE // pipe.vae_scale_factor, 32
    call = family_for(pipe).dummy_call(pipe.transformer.config, 1, (latent, latent))
    sample = torch.zeros(1, (latent // 2) ** 2, width)
    for samples, message in ((dict(controlnet_block_samples=[sample, sample], controlnet_single_block_samples=[sample]),
                              r"got ControlNet samples 2 double- \+ 1 single-stream; this engine takes 1 double- \+ "
                              r"1 single-stream \(the ControlNet it was exported for\)"),
                             (dict(controlnet_block_samples=[sample[:, :4]], controlnet_single_block_samples=[sample]),
                              r"ControlNet samples of shape \(1, 4, 32\) do not fit")):
        with pytest.raises(SlimDiffError, match=message):
            engine(**call, **samples)
    (tmp_path / "plain").mkdir()
    profiles = parse_profiles(batch="1", height=str(SIZE), width=str(SIZE), text_len="512", vae_scale=2, multiple=2)
    build_denoiser_engine(pipe.transformer, "ort", tmp_path / "plain", profiles=profiles, dtype=torch.float32,
                          device="cpu", multiple=2)
    plain = EngineFluxTransformer.from_folder(tmp_path / "plain")
    with pytest.raises(SlimDiffError, match=r"was built without ControlNet sample inputs, so it cannot take "
                                            r"controlnet_block_samples: rebuild it with slimdiff-export "
                                            r"--controlnet-inputs"):
        plain(**call, controlnet_block_samples=[sample], controlnet_single_block_samples=[sample])


@pytest.mark.parametrize("model, flags, message", [
    ("builtin:tiny-flux-controlnet", ["--controlnet", "UNION"], "is a ControlNet-Union model (num_mode 3): its engine "
                                                                "is not built yet"),
    ("builtin:tiny-flux", ["--controlnet-inputs"], "a flux transformer takes as many ControlNet samples as its "
                                                   "ControlNet gives: export --controlnet-inputs from a "
                                                   "FluxControlNetPipeline"),
    ("builtin:tiny-flux-controlnet", ["--triton-repo", "REPO"], "--triton-repo serves FluxControlNetPipeline with its "
                                                                "ControlNet's engine: give --controlnet DIR"),
    ("builtin:tiny-flux-controlnet", ["--controlnet", "CONTROLNET", "--triton-repo", "REPO", "--triton-img2img"],
     "--triton-img2img serves"),
])
def test_export_refusals(model, flags, message, folder, union_controlnet, tmp_path, capsys):
    from slimdiff.cli.export import main as export

    flags = [{"REPO": str(tmp_path / "repo"), "UNION": str(union_controlnet),
              "CONTROLNET": str(folder / "controlnet")}.get(f, f) for f in flags]
    code = export(["--model", model, "--engine", "ort", "--height", str(SIZE), "--width", str(SIZE),
                   "--out", str(tmp_path / "out"), *flags])
    err = one_error_line(capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert "FluxControlNetPipeline" in err[0] or "ControlNet-Union" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "repo").exists()


def test_a_slim_folder_reads_its_controlnet_layout_without_loading_the_pipeline(pipe, folder, tmp_path, monkeypatch):
    """`--controlnet-inputs` on a slim transformer folder alone takes the samples' layout from the configuration of
    the ControlNet of the pipeline folder it was slimmed in, without loading that pipeline (FLUX.1's is tens of GB);
    the FLUX families whose pipelines take no ControlNet refuse the flag in one line."""
    from slimdiff.cli import export as cli
    from slimdiff.families import family_named
    from slimdiff.families.flux import ControlNetSamples
    from slimdiff.plan import RankPlan
    from slimdiff.serialization import PLAN_FILE

    slim = tmp_path / "slim-transformer"
    pipe.transformer.save_pretrained(slim)
    (slim / PLAN_FILE).write_text(RankPlan({}, {"source_model": str(folder), "family": "flux-controlnet"}).to_json())
    monkeypatch.setattr("slimdiff.models.load_pipeline", lambda *a, **k: pytest.fail("the pipeline was loaded"))
    controlnet = cli._slimmed_in_controlnet(str(slim))
    assert ControlNetSamples.of(controlnet) == ControlNetSamples.of(pipe.controlnet)
    for name in ("flux-fill", "flux-control", "flux-kontext"):
        with pytest.raises(SlimDiffError, match=f"{name} transformers take no ControlNet"):
            family_named(name).controlnet_export_option(lambda: controlnet)


def test_measured_call_carries_the_samples(pipe):
    """What `slimdiff bench` times (`calling(pipe)`: the ControlNet's layout): the timed call's inputs carry the
    ControlNet's samples on the colour ramp, and the pipeline's own transformer call mapped onto the exported inputs
    gives the transformer's prediction (its samples included)."""
    from slimdiff.families.flux import pack_latents

    family = family_for(pipe).calling(pipe)
    assert family.controlnet_samples.option == "controlnet-samples:1:1"
    inputs = family.prompt_inputs(pipe, PROMPTS[0], (SIZE, SIZE), "cpu")
    latent = SIZE // pipe.vae_scale_factor
    assert inputs["controlnet_block_sample_0"].shape == (1, latent // 2, latent // 2, 32)
    call = first_transformer_call(pipe, lambda: draw(pipe))
    call.pop("return_dict")  # the bench's routing takes it out too
    with torch.no_grad():
        want = pipe.transformer(**call, return_dict=False)[0]
        named, to_prediction = family.exported_from_call(call)
        got = to_prediction(family.export_call(pipe.transformer, *(named[i.name] for i in
                                                                   family.export_inputs(pipe.transformer.config))))
    assert torch.allclose(got, want, atol=1e-5) and got.shape == pack_latents(torch.zeros(1, 16, latent, latent)).shape


def test_a_guided_controlnet_beside_an_unguided_transformer_is_timed_with_the_pipelines_guidance(pipe):
    """The pipeline embeds its guidance scale in a ControlNet with guidance_embeds whatever its transformer takes:
    the timed call's samples are that ControlNet's at the pipeline's default scale (diffusers raises without one)."""
    import inspect

    from diffusers import FluxControlNetPipeline, FluxTransformer2DModel

    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    unguided = FluxTransformer2DModel.from_config({**config, "guidance_embeds": False})
    mixed = FluxControlNetPipeline(**{**pipe.components, "transformer": unguided})
    assert mixed.controlnet.config.guidance_embeds
    seen = []
    hook = mixed.controlnet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["guidance"]),
                                                      with_kwargs=True)
    try:
        inputs = family_for(mixed).calling(mixed).prompt_inputs(mixed, PROMPTS[0], (SIZE, SIZE), "cpu")
    finally:
        hook.remove()
    scale = inspect.signature(FluxControlNetPipeline.__call__).parameters["guidance_scale"].default
    assert "guidance" not in inputs and "controlnet_block_sample_0" in inputs
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((1,), float(scale)))


# -- Triton serving (slimdiff-export --controlnet DIR --triton-repo) -------------------------------------------------


def test_served_controlnet_pipeline_is_diffusers_pipeline_with_the_engines(pipe, tmp_path):
    """The Triton repository (python mode, in this process over its ONNX Runtime engines) serves the ControlNet's
    engine, the transformer's taking its samples by name, and the VAE encoder (the control image's latent); a request
    carries the control image and may carry the conditioning scale, not a strength. It draws what diffusers'
    FluxControlNetPipeline with the transformer and ControlNet engines draws, within one grey level, and the control
    image and its scale decide what; several ControlNets and a request without a control image are refused in one
    line."""
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel
    from serving_support import SIZE as SERVED, noise_image, served_beside_diffusers

    from slimdiff.engines.triton import _pb, check_pipeline, read_config
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.controlnet import EngineFluxControlNet
    from slimdiff.runtime.triton_models import generate

    pytest.importorskip("tritonclient.grpc")
    repo, served, reference = served_beside_diffusers(pipe, tmp_path)
    use_engine(reference, tmp_path / "controlnet")
    assert isinstance(served.controlnet, EngineFluxControlNet) and isinstance(reference.controlnet,
                                                                              EngineFluxControlNet)
    assert sorted(p.name for p in repo.iterdir()) == ["controlnet", "pipeline", "text_encoder", "text_encoder_2",
                                                      "transformer", "vae_decoder", "vae_encoder"]
    spec = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert spec["pipeline_class"] == "FluxControlNetPipeline" and spec["image_inputs"] == ["control_image"]
    assert spec["controlnet"] is True and spec["vae_encoder"] is True and spec["image_to_image"] is None
    pb, _ = _pb()
    inputs = {t.name: (t.data_type, list(t.dims), t.optional)
              for t in read_config(repo / "pipeline" / "config.pbtxt").input}
    assert inputs["control_image"] == (pb.TYPE_UINT8, [-1, -1, 3], False)
    assert inputs["controlnet_conditioning_scale"] == (pb.TYPE_FP32, [1], True)
    assert "image" not in inputs and "strength" not in inputs
    samples = [t.name for t in read_config(repo / "controlnet" / "config.pbtxt").output]
    transformer_inputs = [t.name for t in read_config(repo / "transformer" / "config.pbtxt").input]
    assert samples == ["controlnet_block_sample_0", "controlnet_single_block_sample_0"]
    assert transformer_inputs[-2:] == samples

    options = dict(seed=3, steps=2, height=SERVED, width=SERVED, control_image=noise_image(1))

    def grey_levels(a, b) -> int:
        return int(abs(a.astype(int) - b.astype(int)).max())

    got = generate(served, "a red circle", **options)
    assert got.shape == (SERVED, SERVED, 3) and got.std() > 1
    assert grey_levels(got, generate(reference, "a red circle", **options)) <= 1
    assert grey_levels(got, generate(served, "a red circle", **{**options, "control_image": noise_image(2)})) > 8
    half = {**options, "controlnet_conditioning_scale": 0.5}
    assert grey_levels(generate(served, "a red circle", **half), generate(reference, "a red circle", **half)) <= 1
    assert grey_levels(got, generate(served, "a red circle", **half)) > 8
    for request, message in (({"control_image": None}, r"request takes control_image, got none$"),
                             ({"strength": 0.5}, r"request takes no strength$")):
        with pytest.raises(SlimDiffError, match=message):
            generate(served, "a red circle", **{**options, **request})
    several = FluxControlNetPipeline(**{**pipe.components,
                                        "controlnet": FluxMultiControlNetModel([pipe.controlnet, pipe.controlnet])})
    with pytest.raises(SlimDiffError, match=r"not FluxControlNetPipeline with several ControlNets$"):
        check_pipeline(several)


def test_exported_repository_serves_the_slim_engines(exported):
    """`slimdiff-export --controlnet DIR --triton-repo`: the repository serves the slim transformer's engine and the
    ControlNet's with the text encoders' and the VAE's; its pipeline, run in this process, draws what the slim
    pipeline with the two engines draws, within one grey level."""
    from serving_support import noise_image

    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    repo = exported.parent / "repo"
    assert sorted(p.name for p in repo.iterdir()) == ["controlnet", "pipeline", "text_encoder", "text_encoder_2",
                                                      "transformer", "vae_decoder", "vae_encoder"]
    served = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
    slim = load_pipeline(str(exported / "slim-unet"))
    slim.set_progress_bar_config(disable=True)
    use_engine(slim, exported / "slim")
    use_engine(slim, exported / "controlnet")
    options = dict(seed=5, steps=2, height=SIZE, width=SIZE, control_image=noise_image(4, SIZE))
    got, want = generate(served, PROMPTS[0], **options), generate(slim, PROMPTS[0], **options)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 1 and abs(got.astype(int) - want.astype(int)).max() <= 1
