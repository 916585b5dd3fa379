"""PixArt's transformer as an engine: its export inputs from the family, one ``slimdiff-export`` run (dense and slim
ONNX Runtime engines, parity-checked with masked T5 padding), the engine as ``pipe.transformer`` in the pipeline,
the benchmark and the quality evaluation on the tiny transformer, and a size range refused in one line."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from export_support import FAST_CALIBRATION

from slimdiff.cli import export as cli
from slimdiff.configs import TINY_PIXART_TRANSFORMER
from slimdiff.engines.build import build_denoiser_engine
from slimdiff.engines.trt import optimization_profiles
from slimdiff.errors import SlimDiffError
from slimdiff.export.modules import denoiser_component
from slimdiff.export.shapes import parse_profiles
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.runtime import EnginePixArtTransformer, use_engine

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(folder, stdout)`` of one ``slimdiff-export --model builtin:tiny-pixart --engine ort`` run."""
    out = tmp_path_factory.mktemp("pixart") / "engines"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["--model", "builtin:tiny-pixart", "--engine", "ort", "--out", str(out), "--budget", "0.3",
                       *FAST_CALIBRATION])
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue()


def _image(pipe, seed=11):
    return pipe(PROMPT, num_inference_steps=4, use_resolution_binning=False, generator=torch.Generator().manual_seed(seed),
                output_type="np").images[0]


def test_the_family_declares_the_transformer_call():
    transformer = build_builtin("builtin:tiny-pixart").transformer
    component = denoiser_component(transformer)
    assert component.name == "transformer" and component.attention_modules == 4
    assert [(s.name, s.dims, s.dtype) for s in component.inputs] == [
        ("hidden_states", ("batch", 4, "height", "width"), "model"), ("timestep", ("batch",), "float32"),
        ("encoder_hidden_states", ("batch", "text_len", 24), "model"),
        ("encoder_attention_mask", ("batch", "text_len"), "model")]
    # parity inputs mask some padding: each sample keeps its first k < tokens tokens
    mask = component.random_inputs({"batch": 4, "height": 16, "width": 16, "text_len": 12}, torch.float32, seed=0)[3]
    assert set(mask.unique().tolist()) == {0.0, 1.0} and (mask[:, 0] == 1).all() and (mask[:, -1] == 0).all()
    assert (mask.diff(dim=1) <= 0).all()  # padding only after the kept tokens
    # the positional call is the transformer's own, padding mask included
    x, t, text, keep = component.random_inputs({"batch": 2, "height": 16, "width": 16, "text_len": 12},
                                                torch.float32, seed=1)
    with torch.no_grad():
        ref = transformer(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=keep,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        assert torch.allclose(component.module(x, t, text, keep), ref, atol=1e-5)
        assert not torch.allclose(component.module(x, t, text, torch.ones_like(keep)), ref, atol=1e-3)


@pytest.mark.slow
def test_export_builds_verified_dense_and_slim_transformer_engines(exported):
    out, stdout = exported
    report = json.loads((out / "export.json").read_text())
    assert report["denoiser"] == "transformer" and report["pytorch_components"] == ["text_encoder", "vae"]
    # one image size (the native 32 px: latent 16) and the Σ pipeline's 300 tokens
    assert report["profiles"] == [{"batch": [1, 2, 4], "height": [16, 16, 16], "width": [16, 16, 16],
                                   "text_len": [300, 300, 300]}]
    assert [(r["variant"], r["file"]) for r in report["rows"]] == [("dense", "dense/transformer.ort.onnx"),
                                                                   ("slim", "slim/transformer.ort.onnx")]
    assert all(r["max_rel_error"] <= 1e-4 for r in report["rows"])
    assert report["rows"][1]["parameters"] < report["rows"][0]["parameters"]
    assert "slim transformer:" in stdout
    for variant in ("dense", "slim"):
        sidecar = json.loads((out / variant / "transformer.onnx.json").read_text())
        # every attention, the masked cross-attentions included, is one fused Attention op
        assert sidecar["fused"]["Attention"] == sidecar["attention_modules"] == 4
        assert sidecar["parity"]["max_rel_error"] <= 1e-4
        assert [i["name"] for i in sidecar["inputs"]] == ["hidden_states", "timestep", "encoder_hidden_states",
                                                          "encoder_attention_mask"]
        meta = json.loads((out / variant / "transformer.engine.json").read_text())
        assert meta["component"] == "transformer" and meta["output_dims"] == ["batch", 8, 16, 16]
        # TensorRT's optimization profile covers the padding mask over batch and tokens
        trt = optimization_profiles(sidecar)[0]
        assert trt["encoder_attention_mask"] == ((1, 300), (2, 300), (4, 300))
        assert trt["hidden_states"] == ((1, 4, 16, 16), (2, 4, 16, 16), (4, 4, 16, 16))


def test_engine_honours_the_padding_mask(exported):
    out, _ = exported
    transformer = build_builtin("builtin:tiny-pixart").transformer
    engine = EnginePixArtTransformer.from_folder(out / "dense")
    assert engine.config.sample_size == 16 and engine.out_channels == 8 and engine.in_channels == 4
    gen = torch.Generator().manual_seed(5)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 300, 24, generator=gen)
    padded = (torch.arange(300) < torch.tensor([[40], [7]])).long()  # as the pipeline passes it: int64
    outputs = []
    for mask in (padded, torch.ones_like(padded)):
        call = dict(encoder_hidden_states=text, timestep=torch.tensor([500, 500]), encoder_attention_mask=mask,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
        with torch.no_grad():
            ref = transformer(x, **call)[0]
        got = engine(x, **call)[0]
        assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
        outputs.append(got)
    assert (outputs[0] - outputs[1]).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", ["dense", "slim"])
def test_engine_in_the_pipeline_makes_the_pytorch_image(exported, variant):
    out, _ = exported
    pipe = load_pipeline("builtin:tiny-pixart" if variant == "dense" else str(out / "slim-unet"))
    reference = _image(pipe)
    engine = use_engine(pipe, out / variant)
    assert pipe.transformer is engine and isinstance(engine, EnginePixArtTransformer)
    pipe.to("cpu")
    image = _image(pipe)
    assert image.shape == reference.shape == (32, 32, 3)
    assert np.abs(image - reference).max() < 1e-3
    assert np.abs(reference - reference.mean()).max() > 1e-3  # not a flat image: the comparison has content


def test_an_engine_of_another_denoiser_is_refused(exported):
    out, _ = exported
    with pytest.raises(SlimDiffError, match="replaces a pipeline's transformer; StableDiffusionPipeline has none"):
        use_engine(build_builtin("builtin:tiny"), out / "dense")


def test_a_size_range_is_refused_in_one_line(tmp_path, capsys):
    assert cli.main(["--model", "builtin:tiny-pixart", "--engine", "ort", "--out", str(tmp_path / "o"),
                     "--height", "16:32:48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--height" in err[0] and "one height" in err[0]
    assert not (tmp_path / "o").exists()


def test_an_alpha_transformer_takes_resolution_and_aspect_ratio(tmp_path):
    from diffusers import PixArtTransformer2DModel

    # PixArt-α 1024's size conditions, each embedded in a third of the width (48 = 2 heads of 24); one block
    config = {**TINY_PIXART_TRANSFORMER, "num_layers": 1, "attention_head_dim": 24, "cross_attention_dim": 48,
              "use_additional_conditions": True}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = PixArtTransformer2DModel(**config).eval()
    profiles = parse_profiles("1:2:2", "32", "32", "120", vae_scale=2, multiple=8)
    _, sidecar = build_denoiser_engine(transformer, "ort", tmp_path, profiles=profiles, dtype=torch.float32,
                                       device="cpu", multiple=8)
    assert [i["name"] for i in sidecar["inputs"]][4:] == ["resolution", "aspect_ratio"]
    assert sidecar["parity"]["max_rel_error"] <= 1e-4
    engine = EnginePixArtTransformer.from_folder(tmp_path)
    gen = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 120, 24, generator=gen)
    mask = (torch.arange(120) < 30).long().expand(2, -1)
    outputs = []
    for sizes in ((32.0, 32.0), (64.0, 48.0)):
        added = {"resolution": torch.tensor([sizes, sizes]), "aspect_ratio": torch.tensor([[1.0], [0.75]])}
        call = {"encoder_hidden_states": text, "timestep": torch.tensor([700, 700]), "encoder_attention_mask": mask,
                "added_cond_kwargs": added, "return_dict": False}
        with torch.no_grad():
            ref = transformer(x, **call)[0]
        got = engine(x, **call)[0]
        assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
        outputs.append(got)
    assert (outputs[0] - outputs[1]).abs().max().item() > 1e-4  # the conditions reach the output
    with pytest.raises(SlimDiffError, match=r"needs added_cond_kwargs\['resolution'\] of shape \(2, 2\)"):
        engine(x, **{**call, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}})


def test_bench_times_the_tiny_transformer_dense_vs_slim(capsys):
    # Synthetic slim plans of the PixArt transformer timed interleaved on eager, on the family's inputs for a prompt
    # (T5 states with their padding mask), and end to end with the pipeline's transformer calls routed to the runner.
    from slimdiff.bench.cli import main
    from slimdiff.bench.harness import BenchConfig, run_bench
    from slimdiff.bench.report import validate_report

    report = run_bench(BenchConfig(model="builtin:tiny-pixart", budgets=[0.0, 0.4], batches=[2], device="cpu",
                                   warmup=1, iters=2, e2e_steps=2, e2e_runs=1), log=lambda msg: None)
    validate_report(report)
    assert report["model"]["denoiser"] == "transformer" and report["model"]["latent"] == [16, 16]
    dense, slim = report["results"]
    assert dense["status"] == slim["status"] == "ok" and dense["error_vs_dense"] == 0.0
    assert slim["interleaved"]["interval"]["pairs"] == 2 and slim["ideal_speedup"] > 1.0
    assert slim["error_vs_dense"] is None  # seeded weights in the resized layers: no quality claim
    assert dense["e2e"]["unet_calls"] == slim["e2e"]["unet_calls"] == 2
    dense_macs, slim_macs = (m["macs"]["2"] for m in report["models"])
    assert slim_macs["transformer"] < dense_macs["transformer"] and slim_macs["other"] == dense_macs["other"]
    # a size off the patch grid is refused in one line (VAE factor 2 × patch size 2)
    assert main(["--model", "builtin:tiny-pixart", "--device", "cpu", "--resolution", "34"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # after the loading line, before any model is built
    assert err[-1] == ("slimdiff bench: error: image height 34 px: PixArtSigmaPipeline takes positive multiples of 4 px "
                       "(VAE scale 2 × latent multiple 2)")
    assert not [line for line in err if "building" in line or "Traceback" in line]


def test_eval_compares_the_exported_slim_transformer_with_the_dense_one(exported, tmp_path):
    # `slimdiff eval` on PixArt: the pipeline's own call options (exact 32 px size) and the T5 padding mask pass through
    from slimdiff.cli.commands import main

    out, _ = exported
    slim = out / json.loads((out / "export.json").read_text())["slim_model"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na green triangle")
    assert main(["eval", "--model", "builtin:tiny-pixart", "--slim", str(slim), "--prompts", str(prompts), "--num",
                 "2", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["size"] == 32 and report["settings"]["unet_calls_per_image"] == 2
    assert 0 < report["metrics"]["noise_prediction_error"]["mean"] < 1
    assert report["slim"]["macs"] < report["dense"]["macs"]
