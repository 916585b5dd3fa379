"""ControlNet pipelines with slim UNets: in PyTorch, and with UNet engines that take the ControlNet's residuals
(``slimdiff-export --controlnet-inputs``) while the ControlNet stays in PyTorch. Seeded tiny models, CPU, ONNX
Runtime."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from export_support import (
    TWO_LEVEL_UNET,
    TWO_LEVEL_XL_UNET,
    cached_export,
    default_ranks,
    seeded_controlnet,
    seeded_unet,
    tiny_profiles,
)

from slimdiff.cli import export as cli
from slimdiff.engines import build_engine, engine_outputs
from slimdiff.engines.build import build_denoiser_engine
from slimdiff.engines.trt import optimization_profiles
from slimdiff.errors import SlimDiffError
from slimdiff.export.modules import denoiser_component
from slimdiff.export.shapes import tensor_shapes
from slimdiff.families import FAMILIES
from slimdiff.families.base import CONTROLNET_RESIDUALS
from slimdiff.families.sd import controlnet_residual_inputs
from slimdiff.models import load_pipeline, load_unet, module_sites
from slimdiff.plan import RankPlan
from slimdiff.rebuild import apply_plan_shapes
from slimdiff.runtime import EngineUNet, use_engine
from slimdiff.serialization import save_slim

PROMPT = "a red circle above a blue square"
IMAGE_PX = 32  # the tiny VAE scales by 2: a latent of 16x16


def truncated_slim(dense):
    """A slim copy of ``dense`` (a real slim structure: q·k at half width, v at three quarters) keeping the leading
    rows and columns of each narrowed weight: not slimdiff's closed forms, but it computes like its seeded dense
    model, so the ControlNet's residuals weigh in the image as in the dense pipeline (re-initialised weights drown
    them). ``(slim UNet, rank plan)``."""
    unet = copy.deepcopy(dense)
    sites = module_sites(unet)
    plan = RankPlan.from_ranks(sites, default_ranks(sites))
    apply_plan_shapes(unet, plan)
    weights = dense.state_dict()
    with torch.no_grad():
        for name, tensor in unet.state_dict().items():
            tensor.copy_(weights[name][tuple(slice(0, n) for n in tensor.shape)])
    return unet.eval(), plan


def control_image() -> torch.Tensor:
    return torch.rand(1, 3, IMAGE_PX, IMAGE_PX, generator=torch.Generator().manual_seed(1))


def controlnet_pipeline(model: str, unet, controlnet):
    """``model``'s pipeline as its ControlNet pipeline, with ``unet`` as its UNet."""
    pipe = load_pipeline(model)
    pipe.unet = unet
    cls = StableDiffusionXLControlNetPipeline if "xl" in model else StableDiffusionControlNetPipeline
    return cls.from_pipe(pipe, controlnet=controlnet)


def generate(pipe, **options) -> np.ndarray:
    return pipe(PROMPT, image=control_image(), num_inference_steps=2, guidance_scale=5.0,
                height=IMAGE_PX, width=IMAGE_PX, generator=torch.Generator().manual_seed(11), output_type="np",
                **options).images[0]


def record_residuals(unet) -> list:
    """Patch ``unet`` to record the residual shapes of each call: ``[(down shapes, mid shape)]``."""
    calls, forward = [], unet.forward

    def recording(*args, **kwargs):
        down, mid = kwargs.get("down_block_additional_residuals"), kwargs.get("mid_block_additional_residual")
        calls.append(([tuple(t.shape) for t in down], tuple(mid.shape)) if down is not None else None)
        return forward(*args, **kwargs)

    unet.forward = recording
    return calls


# ---------------------------------------------------------------------------------------------------------
# PyTorch: a slim UNet in diffusers' ControlNet pipelines
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-xl"])
def test_slim_unet_runs_in_the_controlnet_pipeline(model):
    dense = load_unet(model)
    slim, _ = truncated_slim(dense)
    pipe = controlnet_pipeline(model, slim, seeded_controlnet(dense))
    calls = record_residuals(slim)
    image = generate(pipe)
    assert image.shape == (IMAGE_PX, IMAGE_PX, 3) and np.isfinite(image).all()
    # every step passed the ControlNet's residuals, at the shapes the family declares for engines
    expected = [tensor_shapes(spec.dims, {"batch": 2, "height": 16, "width": 16})
                for spec in controlnet_residual_inputs(slim.config)]
    assert len(calls) >= 2 and all(call == (expected[:-1], expected[-1]) for call in calls)
    # ... and they matter: a conditioning scale of 0 (zero residuals) draws another image
    assert np.abs(generate(pipe, controlnet_conditioning_scale=0.0) - image).max() > 1e-2


@pytest.mark.parametrize("config", [
    pytest.param("builtin:tiny", id="tiny"),
    pytest.param("builtin:tiny-xl", id="tiny-xl"),
    # two resnets per level (SD and SDXL have two), a down block without attention last
    pytest.param(dict(TWO_LEVEL_UNET, layers_per_block=2), id="two-level-2-layers"),
    pytest.param(dict(TWO_LEVEL_XL_UNET, layers_per_block=3), id="two-level-xl-3-layers"),
])
def test_residual_inputs_match_what_the_controlnet_outputs(config):
    unet = load_unet(config) if isinstance(config, str) else seeded_unet(config)
    controlnet = seeded_controlnet(unet)
    batch, height, width = 2, 8, 16  # a non-square latent: heights and widths cannot be swapped unseen
    call = {"sample": torch.randn(batch, 4, height, width), "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(batch, 7, unet.config.cross_attention_dim),
            "controlnet_cond": torch.rand(batch, 3, 2 * height, 2 * width), "return_dict": False}
    if unet.config.addition_embed_type == "text_time":
        width_pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        call["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, width_pooled),
                                     "time_ids": torch.rand(batch, 6) * 64}
    with torch.no_grad():
        down, mid = controlnet(**call)
    specs = controlnet_residual_inputs(unet.config)
    values = {"batch": batch, "height": height, "width": width}
    assert [tensor_shapes(s.dims, values) for s in specs] == [tuple(t.shape) for t in (*down, mid)]
    assert [s.name for s in specs][-1] == "mid_block_additional_residual"


def test_export_options_are_family_knowledge():
    sd = next(f for f in FAMILIES.adapters() if f.name == "sd")
    pixart = next(f for f in FAMILIES.adapters() if f.name == "pixart")
    controlnet_sd = sd.with_export_options([CONTROLNET_RESIDUALS])
    assert controlnet_sd.exporting == {CONTROLNET_RESIDUALS} and not sd.exporting  # a variant; the adapter stays
    assert sd.with_export_options(()) is sd
    with pytest.raises(SlimDiffError, match="pixart denoisers cannot be exported with controlnet inputs"):
        pixart.with_export_options([CONTROLNET_RESIDUALS])
    unet = load_unet("builtin:tiny")
    plain, residual = denoiser_component(unet), denoiser_component(unet, [CONTROLNET_RESIDUALS])
    assert [s.name for s in residual.inputs[:3]] == [s.name for s in plain.inputs]
    # builtin:tiny's skip connections: conv_in's, a resnet's and a down-sampler's at each of the first two levels, a
    # resnet's at the last; then the mid block's
    assert len(residual.inputs) == 3 + 6 + 1
    # the wrapped call adds the residuals: zeros give the plain UNet's output, others another
    inputs = residual.random_inputs({"batch": 1, "height": 8, "width": 8, "text_len": 7}, torch.float32, seed=0)
    with torch.no_grad():
        reference = plain.module(*inputs[:3])
        assert torch.equal(residual.module(*inputs[:3], *(torch.zeros_like(t) for t in inputs[3:])), reference)
        assert (residual.module(*inputs) - reference).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Engines: slimdiff-export --controlnet-inputs, EngineUNet and use_engine
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet_export(tmp_path_factory):
    """``slimdiff-export --controlnet DIR`` (which implies ``--controlnet-inputs``) of a slim builtin:tiny UNet folder
    and a ControlNet made from builtin:tiny's UNet to ONNX Runtime engines (the UNet's: slim only, one export),
    latent 8..16 (a slim folder has no VAE: pixels are counted at SD's factor 8), batch 1..2 (guidance), CLIP's 77
    tokens: ``(slim UNet engine folder, slim UNet, stdout)``; the ControlNet's engine is in its sibling
    ``controlnet``."""
    root = tmp_path_factory.mktemp("controlnet")
    slim, plan = truncated_slim(load_unet("builtin:tiny"))
    save_slim(slim, plan, root / "slim-unet")
    seeded_controlnet(load_unet("builtin:tiny")).save_pretrained(root / "controlnet-model")
    out = root / "engines"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["--model", str(root / "slim-unet"), "--engine", "ort", "--out", str(out), "--controlnet",
                       str(root / "controlnet-model"), "--batch", "1:2:2", "--height", "64:128:128", "--width",
                       "64:128:128", "--text-len", "77"])
    assert rc == 0, stderr.getvalue()
    return out / "slim", slim, stdout.getvalue()


@pytest.mark.slow
def test_export_builds_a_verified_engine_with_residual_inputs(controlnet_export):
    folder, slim, printed = controlnet_export
    meta = json.loads((folder / "unet.engine.json").read_text())
    assert meta["export_options"] == [CONTROLNET_RESIDUALS]
    names = [i["name"] for i in meta["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states",
                     *(f"down_block_additional_residual_{i}" for i in range(6)), "mid_block_additional_residual"]
    assert [i["dims"] for i in meta["inputs"][3:]] == [list(s.dims) for s in controlnet_residual_inputs(slim.config)]
    # the graph keeps the residuals' latent axes dynamic, tied to the sample's
    sidecar = json.loads((folder / "unet.onnx.json").read_text())
    assert all(isinstance(d, str) for i in sidecar["inputs"][3:] for d in i["dims"][2:])
    assert len(sidecar["parity"]["shapes"]) == 2 and sidecar["parity"]["max_rel_error"] < 1e-4
    # a TensorRT profile sizes them by their level: latent 8..16 (opt 16), batch 1..2, the mid block two levels down
    profile = optimization_profiles(sidecar)[0]
    assert profile["mid_block_additional_residual"] == ((1, 64, 2, 2), (2, 64, 4, 4), (2, 64, 4, 4))
    assert profile["down_block_additional_residual_0"] == ((1, 32, 8, 8), (2, 32, 16, 16), (2, 32, 16, 16))
    # verified against PyTorch with random residuals, called as the pipeline calls it (the table's error column)
    rows = json.loads((folder.parent / "export.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["slim", "controlnet"] and all(r["max_rel_error"] < 1e-4 for r in rows)
    assert "slim" in printed and "controlnet/controlnet.ort.onnx" in printed


@pytest.mark.slow
def test_engine_takes_residuals_checks_them_and_adds_zeros_without(controlnet_export):
    folder, slim, _ = controlnet_export
    engine = EngineUNet.from_folder(folder)
    assert engine.takes_controlnet_residuals
    component = denoiser_component(slim, [CONTROLNET_RESIDUALS])
    inputs = component.random_inputs({"batch": 2, "height": 8, "width": 16, "text_len": 77}, torch.float32, seed=3)
    sample, timestep, text, *residuals = inputs
    with torch.no_grad():
        expected = slim(sample, timestep, text, down_block_additional_residuals=tuple(residuals[:-1]),
                        mid_block_additional_residual=residuals[-1]).sample
        plain = slim(sample, timestep, text).sample
    got = engine(sample, timestep, text, down_block_additional_residuals=tuple(residuals[:-1]),
                 mid_block_additional_residual=residuals[-1]).sample
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (plain - expected).abs().max() > 1e-3  # the residuals change the output
    without = engine(sample, timestep, text).sample  # a plain pipeline's call: zero residuals
    assert (without - plain).abs().max() <= 1e-4 * plain.abs().max()
    with pytest.raises(SlimDiffError, match=r"do not fit this UNet at a latent of 8x16") as info:
        engine(sample, timestep, text, down_block_additional_residuals=tuple(residuals[:-2]),
               mid_block_additional_residual=residuals[-1])
    assert "\n" not in str(info.value)
    with pytest.raises(SlimDiffError, match="got down_block_additional_residuals alone"):
        engine(sample, timestep, text, down_block_additional_residuals=tuple(residuals[:-1]))


@pytest.mark.slow
def test_controlnet_pipeline_with_the_slim_engine_draws_the_pytorch_image(controlnet_export):
    folder, slim, _ = controlnet_export
    controlnet = seeded_controlnet(load_unet("builtin:tiny"))
    pipe = controlnet_pipeline("builtin:tiny", slim, controlnet)
    reference = generate(pipe)
    engine = use_engine(pipe, folder)
    assert pipe.unet is engine and pipe.controlnet is controlnet  # the ControlNet stays in PyTorch
    image = generate(pipe)
    assert image.shape == reference.shape == (IMAGE_PX, IMAGE_PX, 3)
    assert np.abs(image - reference).max() < 1e-3
    assert np.abs(reference - reference.mean()).max() > 1e-3  # not a flat image: the comparison has content
    # the residuals reach the engine: zero residuals (a conditioning scale of 0) draw another image there too
    assert np.abs(generate(pipe, controlnet_conditioning_scale=0.0) - image).max() > 1e-2
    # the ControlNet as an engine too: every network of the loop but the text encoder and the VAE is an engine
    guessed = generate(pipe, guess_mode=True, controlnet_conditioning_scale=0.5)
    engine_controlnet = use_engine(pipe, folder.parent / "controlnet")  # the command's, of this very ControlNet
    assert pipe.controlnet is engine_controlnet and isinstance(engine_controlnet, ControlNetModel)
    assert [o["name"] for o in engine_outputs(engine_controlnet.meta)] == [
        r.name for r in controlnet_residual_inputs(slim.config)]  # what the UNet engine takes, by name
    assert np.abs(generate(pipe) - reference).max() < 1e-3
    # guess mode's per-level scales and the conditioning scale, applied after the engine as after the network
    assert np.abs(generate(pipe, guess_mode=True, controlnet_conditioning_scale=0.5) - guessed).max() < 1e-3
    assert np.abs(guessed - image).max() > 1e-2
    # the ControlNet engine takes the weights of another ControlNet of its architecture without an export
    other = seeded_controlnet(load_unet("builtin:tiny"), seed=1)
    engine_controlnet.load_weights_from(other)
    with_other = generate(pipe)
    pipe.controlnet = other
    assert np.abs(with_other - generate(pipe)).max() < 1e-3
    assert np.abs(with_other - image).max() > 1e-2


def controlnet_engine(controlnet, folder, batch: str = "1:2:2"):
    """An ONNX Runtime engine of ``controlnet`` in the new folder ``folder``, for 32 px images (latent 16 with the tiny
    VAE) and CLIP's 77 tokens."""
    from slimdiff.engines.build import build_controlnet_engine
    from slimdiff.export.shapes import parse_profiles

    folder.mkdir()
    profiles = parse_profiles(batch, str(IMAGE_PX), str(IMAGE_PX), "77", vae_scale=2, multiple=4)
    build_controlnet_engine(controlnet, "ort", folder, profiles=profiles, dtype=torch.float32, device="cpu",
                            multiple=4)
    return folder


def test_engine_without_residual_inputs_refuses_them_in_one_line(tmp_path_factory):
    path, sidecar, unet = cached_export(tmp_path_factory, "dense")  # the plain engine other tests share
    folder = tmp_path_factory.mktemp("plain_ort")
    build_engine("ort", denoiser_component(unet), folder, axes=sidecar["axes"], profiles=sidecar["profiles"],
                 dtype=torch.float32, device="cpu", onnx_path=path,
                 extra={"unet_config": dict(unet.config), "variant": "dense"})
    pipe = controlnet_pipeline("builtin:tiny", unet, seeded_controlnet(unet))
    engine = use_engine(pipe, folder)
    assert not engine.takes_controlnet_residuals
    with pytest.raises(SlimDiffError) as info:
        generate(pipe)
    message = str(info.value)
    assert "built without ControlNet residual inputs" in message and "--controlnet-inputs" in message
    assert "down_block_additional_residuals and mid_block_additional_residual" in message and "\n" not in message


def test_controlnet_inputs_without_a_controlnet_for_a_triton_repository_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--model", "builtin:tiny", "--engine", "ort", "--out", str(out), "--controlnet-inputs",
                   "--triton-repo", str(tmp_path / "repo"), "--triton-mode", "python"])
    err = capsys.readouterr().err
    assert rc != 0 and "serves a ControlNet pipeline with its ControlNet's engine: give --controlnet DIR" in err
    assert not out.exists() and not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_sdxl_controlnet_pipeline_with_a_slim_engine(tmp_path):
    """SDXL's ControlNet pipeline (text_embeds and time_ids before the residuals) with a slim two-level tiny-xl UNet
    (the export's time follows the graph) as an ONNX Runtime engine, against the same slim UNet in PyTorch."""
    dense = seeded_unet(TWO_LEVEL_XL_UNET)
    slim, plan = truncated_slim(dense)
    build_denoiser_engine(slim, "ort", tmp_path, profiles=tiny_profiles(batch="2", text_len="77"),
                          dtype=torch.float32, device="cpu", multiple=8, plan=plan,
                          export_options=(CONTROLNET_RESIDUALS,))
    pipe = controlnet_pipeline("builtin:tiny-xl", slim, seeded_controlnet(dense))
    reference = generate(pipe)
    engine = use_engine(pipe, tmp_path)
    assert [i["name"] for i in engine.meta["inputs"][3:6]] == ["text_embeds", "time_ids",
                                                               "down_block_additional_residual_0"]
    image = generate(pipe)
    assert np.abs(image - reference).max() < 1e-3
    assert np.abs(reference - reference.mean()).max() > 1e-3
    # and its ControlNet as an engine (text_embeds and time_ids before the conditioning image)
    controlnet = use_engine(pipe, controlnet_engine(pipe.controlnet, tmp_path / "controlnet", batch="2"))
    assert [i["name"] for i in controlnet.meta["inputs"][3:]] == ["text_embeds", "time_ids", "folded_controlnet_cond"]
    assert np.abs(generate(pipe) - reference).max() < 1e-3
