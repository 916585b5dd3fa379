"""`slimdiff bench` and `slimdiff eval` on FLUX: builtin:tiny-flux (seeded weights) on the CPU at 32 px.

What FLUX changes for the measuring harnesses, all said by its family: the timestep is a flow-matching sigma in
[0, 1], the pipeline calls the transformer on packed latents with their positions (the exported call takes them
unpacked), guidance is embedded (one denoiser row per image, no classifier-free batch), seeded latents are drawn
packed, and the default size is FluxPipeline's (the transformer config has no sample_size).
"""

import json
import math

import pytest
import torch

from slimdiff.errors import SlimDiffError

PROMPTS = ("a red cube on a table", "a green triangle")
BATCHES = (1, 2)


@pytest.fixture(scope="module")
def bench():
    # Dense and one synthetic slim plan, timed on eager and ONNX Runtime; the dense runners are kept for the
    # pipeline-routed checks below.
    from slimdiff.bench.harness import Bench, BenchConfig

    bench = Bench(BenchConfig(model="builtin:tiny-flux", engines=["eager", "ort"], budgets=[0.0, 0.4],
                              batches=list(BATCHES), resolution=32, device="cpu", warmup=1, iters=2, e2e_steps=2,
                              e2e_runs=1), log=lambda msg: None)
    bench.prepare()
    bench.run_engines(bench.cfg.engines, keep_dense=True)
    yield bench
    bench.release_dense()


@pytest.fixture(scope="module")
def report(bench):
    from slimdiff.bench.report import validate_report

    body = bench.report()
    validate_report(body)
    return body


@pytest.mark.slow  # two ONNX Runtime exports (dense and slim) in the module fixture
def test_bench_times_dense_and_slim_on_eager_and_ort(report):
    assert report["model"]["family"] == "flux" and report["model"]["denoiser"] == "transformer"
    assert report["model"]["resolution"] == 32 and report["model"]["latent"] == [16, 16]
    cells = {(r["engine"], r["budget"], r["batch"]): r for r in report["results"]}
    assert set(cells) == {(e, b, n) for e in ("eager", "ort") for b in (0.0, 0.4) for n in BATCHES}
    assert all(r["status"] == "ok" for r in cells.values()), report["results"]
    for (engine, budget, batch), r in cells.items():
        if budget:
            assert r["interleaved"]["interval"]["pairs"] == 2 and r["ideal_speedup"] > 1.0
            low, high = r["interleaved"]["interval"]["low"], r["interleaved"]["interval"]["high"]
            assert low <= r["speedup"] <= high
        else:
            assert r["error_vs_dense"] < 1e-4
        if engine == "ort":
            assert r["error_vs_eager"] < 1e-4  # the engine computes the family's exported call
        # guidance is embedded: every batch runs end to end, one image per denoiser row
        assert r["e2e"]["images"] == batch and r["e2e"]["unet_calls"] == 2
    assert cells[("ort", 0.0, 2)]["e2e"]["image_error_vs_dense"] < 1e-4  # the ORT engine draws the eager images
    dense, slim = (m["macs"]["2"] for m in report["models"])
    assert slim["transformer"] < dense["transformer"] and dense["latent"] == [16, 16]


def test_the_pipeline_routed_run_goes_through_the_engine(bench):
    # FluxPipeline's packed calls reach the ONNX Runtime runner unpacked, and the PyTorch transformer's blocks never
    # run; the eager runner runs them. The ORT images equal the dense eager images of the same seed.
    from slimdiff.bench.timing import CallTimer

    pipe = bench.pipe
    ort, eager = bench.dense_runs["ort"], bench.dense_runs["eager"]
    latents, block_calls = [], []

    def recorded(*inputs):
        latents.append(tuple(inputs[0].shape))
        return ort(*inputs)

    handle = pipe.transformer.transformer_blocks[0].register_forward_hook(lambda *args: block_calls.append(1))
    try:
        timer = CallTimer("cpu")
        images = bench._pipeline(pipe, recorded, 2, timer)
        assert latents == [(2, 16, 16, 16)] * 2 and timer.calls == 2 and not block_calls
        assert (images - bench.e2e_ref[2]).abs().max() < 1e-4
        assert images.std() > 0  # an image, not a constant
        bench._pipeline(pipe, eager, 1, CallTimer("cpu"))
        assert len(block_calls) == 2
    finally:
        handle.remove()


def test_the_family_maps_the_pipelines_packed_call_onto_the_exported_inputs():
    from slimdiff.families import family_for
    from slimdiff.families.flux import latent_ids, pack_latents
    from slimdiff.models import build_builtin

    family = family_for(build_builtin("builtin:tiny-flux", device="meta").transformer)
    latent = torch.randn(2, 16, 8, 12)
    call = {"hidden_states": pack_latents(latent), "encoder_hidden_states": torch.zeros(2, 5, 96),
            "img_ids": latent_ids(4, 6), "txt_ids": torch.zeros(5, 3), "joint_attention_kwargs": {}}
    inputs, to_prediction = family.exported_from_call(call)
    assert set(inputs) == {"hidden_states", "encoder_hidden_states"}  # positions and empty kwargs consumed
    assert torch.equal(inputs["hidden_states"], latent) and torch.equal(to_prediction(latent), call["hidden_states"])
    with pytest.raises(SlimDiffError, match="take the text-to-image pipeline's positions"):
        family.exported_from_call({**call, "img_ids": latent_ids(4, 6) + torch.tensor([1.0, 0, 0])})  # Kontext's
    kept, _ = family.exported_from_call({**call, "joint_attention_kwargs": {"scale": 0.5}})
    assert kept["joint_attention_kwargs"] == {"scale": 0.5}  # left for the harness to refuse


def test_timesteps_are_sigmas_in_the_unit_interval(bench):
    # The timed calls take sigma 0.5 (the schedulers' 500 of 1000 elsewhere); parity checks draw sigmas in [0, 1).
    from slimdiff.export.modules import denoiser_component
    from slimdiff.families import SIGMA

    transformer = bench.pipe.transformer
    specs = {s.name: s for s in bench.family.export_inputs(transformer.config)}
    assert specs["timestep"].draw == SIGMA
    names = [s.name for s in bench.family.export_inputs(transformer.config)]
    call = dict(zip(names, bench.inputs.get(2)))
    assert torch.equal(call["timestep"], torch.full((2,), 0.5))
    assert torch.equal(call["guidance"], torch.full((2,), 3.5))  # FluxPipeline's own default scale
    assert call["encoder_hidden_states"].shape == (2, 512, 96)
    drawn = denoiser_component(transformer).random_inputs({"batch": 512, "height": 4, "width": 4, "text_len": 4},
                                                          torch.float32, seed=0)
    sigma = drawn[names.index("timestep")]
    assert 0 <= sigma.min() and sigma.max() < 1 and sigma.std() > 0.2  # uniform, not N(0, 1)


def test_seeded_latents_are_packed_and_do_not_depend_on_batching(bench):
    from slimdiff.families import image_generators

    config = bench.pipe.transformer.config
    both = bench.family.seeded_latents(config, (16, 12), image_generators([3, 4]))
    assert both.shape == (2, 8 * 6, 64)
    assert torch.equal(both[1:], bench.family.seeded_latents(config, (16, 12), image_generators([4])))


def test_default_size_is_flux1s_1024_px():
    # The transformer config has no sample_size: FluxPipeline's default (128 latent pixels: 1024 px at VAE scale 8)
    from slimdiff.bench.memory import latent_size, unet_config

    assert latent_size("builtin:flux-dev-shape", unet_config("builtin:flux-dev-shape"), None) == (128, 128)
    assert latent_size("builtin:tiny-flux", unet_config("builtin:tiny-flux"), 32) == (16, 16)  # tiny VAE: scale 2


def test_macs_only_reports_the_default_latent(capsys):
    from slimdiff.bench.cli import main

    assert main(["--model", "builtin:tiny-flux", "--macs-only", "--budgets", "0,0.4", "--budget-unit", "macs",
                 "--batch", "1", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["latent"] == [128, 128]
    dense, slim = body["rows"]
    assert dense["macs"]["latent"] == [128, 128] and slim["ideal_speedup"] > 1.0


@pytest.fixture(scope="module")
def evaluated(bench, tmp_path_factory):
    """``slimdiff eval`` of the synthetic slim transformer and of the dense model against itself."""
    from slimdiff.cli.commands import main
    from slimdiff.serialization import save_slim

    root = tmp_path_factory.mktemp("flux-eval")
    slim = bench.models[1]
    save_slim(slim.denoiser, slim.plan, root / "slim")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    reports = {}
    for name, source in (("slim", str(root / "slim")), ("dense", "builtin:tiny-flux")):
        out = root / f"eval-{name}"
        assert main(["eval", "--model", "builtin:tiny-flux", "--slim", source, "--prompts", str(prompts), "--num",
                     "2", "--steps", "2", "--resolution", "32", "--device", "cpu", "--out", str(out)]) == 0
        reports[name] = json.loads((out / "report.json").read_text())
    return reports


def test_eval_compares_slim_and_dense_images_from_the_same_seeds(evaluated):
    report = evaluated["slim"]
    assert report["settings"]["size"] == 32 and report["settings"]["unet_calls_per_image"] == 2
    assert report["label"].startswith("seeded random")
    m = report["metrics"]
    timesteps = m["noise_prediction_error"]["timesteps"]
    assert len(timesteps) == 2 and all(0 <= t <= 1000 for t in timesteps)  # sigma × 1000, as calibration reads it
    assert 0 < m["noise_prediction_error"]["mean"] and math.isfinite(m["noise_prediction_error"]["mean"])
    assert math.isfinite(m["fidelity"]["psnr_db"]["mean"]) and m["fidelity"]["psnr_db"]["identical_pairs"] == 0
    assert -1 <= m["fidelity"]["ssim"]["mean"] <= 1
    assert report["slim"]["macs"] < report["dense"]["macs"] and report["slim"]["params"] < report["dense"]["params"]


def test_eval_of_the_dense_model_against_itself_is_identical(evaluated):
    m = evaluated["dense"]["metrics"]
    assert m["noise_prediction_error"]["mean"] == 0.0
    assert m["fidelity"]["psnr_db"]["identical_pairs"] == 2 and m["fidelity"]["ssim"]["mean"] == 1.0
