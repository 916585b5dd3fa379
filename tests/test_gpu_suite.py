"""The GPU suite's CPU dry run, the plans it measures, and the attention-kernel zero-padding it studies."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from slimdiff.bench.report import validate_report
from slimdiff.errors import SlimDiffError

ROOT = Path(__file__).resolve().parents[1]


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "suite"
    # Eager stands in for the CUDA engines; phase 4 (compile + AOTInductor builds: minutes on a CPU) is left out
    # here and listed as skipped with its reason — the full dry run is the README command.
    # No deadline here: a loaded CI machine must not turn a phase into "skipped" (the suite's deadline logic is
    # its own behaviour, not what this test checks).
    assert _suite_module().main(["--dry-run", "--engines", "eager", "--skip", "4", "--deadline", "1e6",
                                 "--hard-limit", "2e6", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "suite.json", "latency_table.json",
                                                "speedup.png"}
    suite = json.loads((out / "suite.json").read_text())
    phases = suite["phases"]
    assert list(phases) == ["p1a_headline_mac_plans", "p2_latency_table", "p1b_latency_plans",
                            "p1c_compiled_headline", "p3_attention_kernels", "p9_attention_core", "p4_compiled_sd15",
                            "p5_calibration",
                            "p8_sdxl_refiner", "p6_sd3_medium", "p7_flux_dev"]
    assert phases["p4_compiled_sd15"]["status"] == "skipped" and "--skip" in phases["p4_compiled_sd15"]["reason"]
    assert all(p["status"] == "ok" for k, p in phases.items() if k != "p4_compiled_sd15"), phases
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    labels = {m["label"] for m in report["models"] if m["budget"] > 0}
    assert {"transformer MACs −40 %", "transformer MACs −60 %"} <= labels
    slim = [r for r in report["results"] if r["budget"] > 0 and r["status"] == "ok"]
    assert slim and all(r["interleaved"]["interval"]["pairs"] >= 2 for r in slim)
    assert {r["batch"] for r in slim} == {1, 2}
    assert phases["p2_latency_table"]["result"]["predicted_ceiling"] > 0  # a value, not a speed claim: CPU timing
    shapes = phases["p3_attention_kernels"]["result"]["shapes"]
    assert shapes and all(p["max_abs_diff"] < 1e-4 for s in shapes for p in s["padded"])
    calibration = phases["p5_calibration"]["result"]
    assert all(c["projected_500x25_s"] > 0 and c["peak_host_rss_bytes"] > 0 for c in calibration.values())
    refiner = phases["p8_sdxl_refiner"]["result"]  # the refiner's UNet at batch 2, the headline's MAC fractions
    assert refiner["model"] == "builtin:tiny-xl-refiner" and refiner["batch"] == 2
    assert {c["budget"] for c in refiner["results"]} == {0.0, 0.4, 0.6}
    assert all(c["ideal_speedup"] > 1.0 for c in refiner["results"] if c["budget"] > 0)
    dit = phases["p6_sd3_medium"]["result"]  # the DiT through the same harness: SD3's transformer, MAC plans
    assert dit["model"] == "builtin:tiny-sd3" and {c["budget"] for c in dit["results"]} == {0.0, 0.33, 0.5}
    slim_dit = [c for c in dit["results"] if c["budget"] > 0]
    assert all(c["status"] == "ok" and c["interval"][0] <= c["speedup"] <= c["interval"][1] for c in slim_dit)
    assert all(c["ideal_speedup"] > 1.0 for c in slim_dit)
    flux = phases["p7_flux_dev"]["result"]  # FLUX's transformer at batch 1: guidance embedded, no CFG batch
    assert flux["model"] == "builtin:tiny-flux" and flux["resolution"] == 32 and flux["batch"] == 1
    assert {(c["budget"], c["batch"]) for c in flux["results"]} == {(0.0, 1), (0.33, 1), (0.5, 1)}
    slim_flux = [c for c in flux["results"] if c["budget"] > 0]
    assert all(c["status"] == "ok" and c["interval"][0] <= c["speedup"] <= c["interval"][1] for c in slim_flux)
    assert all(c["ideal_speedup"] > 1.0 for c in slim_flux)
    text = (out / "report.md").read_text()
    assert "Headline: dense vs slim" in text and "Dry run" in text and "builtin:tiny-sd3 transformer" in text
    assert "builtin:tiny-flux transformer (float32, 32², batch 1" in text
    assert "builtin:tiny-xl-refiner UNet (float32" in text
    core = phases["p9_attention_core"]["result"]
    assert core["shapes"] and all(r["modules"] > 0 and r["floor_ms"] > 0 for r in core["shapes"])
    assert all(r["width"] > core["floor"] for r in core["shapes"]) and "predicted_ceiling_half_heads" in core
    assert "Attention core alone" in text
    breakdown = phases["p2_latency_table"]["result"]["time_breakdown"]
    assert breakdown[-1]["kind"] == "rest" and "Where the time goes" in text

    # A rerun on the table measured above (how a second device call spends its time on the compiled engine):
    # the table is not measured again, and only the asked batch and plans are built.
    again = tmp_path / "rerun"
    assert _suite_module().main(["--dry-run", "--engines", "eager", "--batches", "2", "--mac-fractions", "",
                                 "--speedups", "1.01", "--skip", "3,4,5,6,7,8", "--latency-table",
                                 str(out / "latency_table.json"), "--deadline", "1e6", "--hard-limit", "2e6",
                                 "--out", str(again)]) == 0
    rerun = json.loads((again / "suite.json").read_text())
    assert rerun["phases"]["p2_latency_table"]["status"] == "skipped"
    assert "not measured again" in rerun["phases"]["p2_latency_table"]["reason"]
    assert list(rerun["phases"]["p1b_latency_plans"]["result"]) == ["--speedup 1.01"]
    report = json.loads((again / "report.json").read_text())
    assert {r["batch"] for r in report["results"]} == {2}
    assert {m["label"] for m in report["models"] if m["budget"] > 0} == {"--speedup 1.01"}


def test_rerun_with_an_unreadable_latency_table_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "suite"
    assert _suite_module().main(["--dry-run", "--latency-table", str(tmp_path / "none.json"), "--out",
                                 str(out)]) == 2
    assert "cannot read latency table" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".suite.partial-*"))


def test_transformer_mac_plan_removes_the_asked_fraction(tiny_pipe):
    from slimdiff.bench.plans import transformer_mac_plan
    from slimdiff.bench.studies import transformer_macs_removed

    plan = transformer_mac_plan(tiny_pipe.unet, 0.4, (16, 16))
    assert abs(transformer_macs_removed(tiny_pipe.unet, plan, (16, 16), batch=2) - 0.4) < 0.05
    with pytest.raises(SlimDiffError):
        transformer_mac_plan(tiny_pipe.unet, 0.999, (16, 16))


def test_unequal_head_widths_leave_the_flash_kernel_and_zero_padding_is_exact():
    # The CPU-side check of the reasoning behind --pad-heads: SDPA's flash kernels take one head width for q, k
    # and v; a slim head (q·k width ≠ v width) runs the math path. Zero-padding to one width brings the flash
    # kernel back and changes no output (the scale stays 1/√(native q·k width)).
    from slimdiff.bench.studies import _pad_heads, sdpa_backend

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 64, 40, generator=gen), torch.randn(2, 4, 77, 40, generator=gen)
    v = torch.randn(2, 4, 77, 24, generator=gen)
    scale = 40 ** -0.5
    assert sdpa_backend(q, k, v, scale) == "math"
    padded = [_pad_heads(x, 40) for x in (q, k, v)]
    assert sdpa_backend(*padded, scale) == "flash (CPU)"
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    out = torch.nn.functional.scaled_dot_product_attention(*padded, scale=scale)[..., :24]
    torch.testing.assert_close(out, ref)


def test_bench_pad_heads_gives_equal_widths_and_the_same_outputs():
    from diffusers.models.attention_processor import Attention

    from slimdiff.bench.harness import Bench, BenchConfig
    from slimdiff.bench.plans import seeded_slim_copy

    bench = Bench(BenchConfig(model="builtin:tiny", budgets=[0.0, 0.4], batches=[1], device="cpu", e2e=False,
                              pad_heads=8), log=lambda msg: None)
    bench.prepare()
    slim = bench.models[1]
    assert slim.info["head_padding"]  # the synthetic plan cuts q·k and v to different widths
    for m in slim.unet.modules():
        if isinstance(m, Attention):
            assert m.to_q.out_features == m.to_k.out_features == m.to_v.out_features
    unpadded = seeded_slim_copy(bench.pipe.unet, slim.plan, 0)
    sample, timestep, context = bench.inputs.get(1)
    with torch.no_grad():
        ref = unpadded(sample, timestep, encoder_hidden_states=context).sample
        out = slim.unet(sample, timestep, encoder_hidden_states=context).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert bench.model_entries[1]["head_padding"] == slim.info["head_padding"]


def test_sdxl_unets_are_benchmarked_with_their_added_conditions():
    # The family makes the call's inputs for a prompt: SDXL's pooled text embeddings and the micro-conditioning of
    # an uncropped image at the benchmark's size, after (sample, timestep, encoder_hidden_states), and the engines
    # run the family's positional call — the UNet's own call with added_cond_kwargs.
    from slimdiff.bench.harness import Bench, BenchConfig
    from slimdiff.bench.studies import _attention_tokens

    bench = Bench(BenchConfig(model="builtin:tiny-xl", budgets=[0.0], batches=[2], device="cpu", e2e=False),
                  log=lambda msg: None)
    bench.prepare()
    unet = bench.pipe.unet
    sample, timestep, context, text_embeds, time_ids = bench.inputs.get(2)
    assert [s.name for s in bench.inputs.specs][3:] == ["text_embeds", "time_ids"]
    assert time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2 and text_embeds.shape == (2, 32)
    assert (text_embeds[0] == text_embeds[1]).all() and text_embeds.abs().sum() > 0  # the prompt's pooled embedding
    with torch.no_grad():
        ref = unet(sample, timestep, encoder_hidden_states=context, return_dict=False,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]
        with pytest.raises(Exception):  # the bare UNet cannot be called without its added conditions
            unet(sample, timestep, encoder_hidden_states=context)
    torch.testing.assert_close(bench.refs[2], ref)
    tokens = _attention_tokens(unet, (16, 16))
    assert tokens and all(k == q or k == 77 for q, k in tokens.values())
