"""Stable model fingerprints: same weights and architecture → same digest, in every process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from slimdiff.fingerprint import architecture_config, config_fingerprint, model_fingerprint
from slimdiff.models import build_builtin

# The keys of SD-1.5's unet/config.json as diffusers 0.6 wrote it: every key added since is missing.
OLD_UNET_KEYS = ("_class_name", "_diffusers_version", "act_fn", "attention_head_dim", "block_out_channels",
                 "center_input_sample", "cross_attention_dim", "down_block_types", "downsample_padding",
                 "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor",
                 "norm_eps", "norm_num_groups", "out_channels", "sample_size", "up_block_types")


def test_bookkeeping_and_order_do_not_count():
    base = {"in_channels": 4, "block_out_channels": (32, 64), "_use_default_values": ["a", "b"]}
    shuffled = {"_use_default_values": ["b", "a"], "block_out_channels": [32, 64], "in_channels": 4,
                "_name_or_path": "/somewhere", "_diffusers_version": "0.6.0", "_class_name": "UNet2DConditionModel"}
    assert architecture_config(shuffled) == {"in_channels": 4, "block_out_channels": [32, 64]}
    assert config_fingerprint(base) == config_fingerprint(shuffled)
    assert config_fingerprint(base) != config_fingerprint({**base, "in_channels": 9})


def test_weights_and_architecture_count(tiny_pipe):
    unet = tiny_pipe.unet
    names = [n for n, _ in unet.named_parameters() if ".ff." in n]
    before = model_fingerprint(unet, names)
    assert model_fingerprint(unet, reversed(names)) == before
    with torch.no_grad():
        dict(unet.named_parameters())[names[0]].add_(1e-3)
    assert model_fingerprint(unet, names) != before
    assert model_fingerprint(unet, names[1:]) != model_fingerprint(unet, names)


@pytest.fixture(scope="module")
def sparse_config_pipeline(tmp_path_factory):
    """builtin:tiny saved as a pipeline folder whose unet/config.json has only the keys old diffusers wrote."""
    folder = tmp_path_factory.mktemp("sparse") / "pipe"
    build_builtin("builtin:tiny").save_pretrained(folder)
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: config[k] for k in OLD_UNET_KEYS if k in config} |
                                      {"_diffusers_version": "0.6.0"}))
    return folder


# Process 1 stops after the first checkpoint (as an interrupted run does); the SlimSet is the whole 3-prompt
# file, in order, so the CLI's resume sees the same prompts and configuration.
_INTERRUPTED_CALIBRATION = textwrap.dedent("""
    import sys
    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.models import load_pipeline
    from slimdiff.prompts import read_prompts

    def stop(stage, batches):
        raise SystemExit(7)

    config = CalibrationConfig(steps=2, pass1_prompts=1)
    calibrate(load_pipeline(sys.argv[1]), read_prompts(sys.argv[2]), sys.argv[3], config, progress=False,
              on_batch=stop)
""")


def _run(args, seed, check=True):
    # one thread: on a loaded 2-core machine, spinning OpenMP workers of parallel processes cost several times more
    env = {**os.environ, "PYTHONHASHSEED": str(seed), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_calibrate_resume_slim_in_separate_processes(sparse_config_pipeline, tmp_path):
    # A pipeline folder whose UNet config is sparse: the case where diffusers' bookkeeping keys (their order
    # changes per process) once broke the fingerprint. The same three processes on builtin:tiny repeated this
    # path at 45–90 s of CI time; built-in configs are plain dicts in code.
    model = str(sparse_config_pipeline)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green cone\n")
    stats, out = tmp_path / "stats", tmp_path / "slim"
    flags = ["--prompts", str(prompts), "--num-prompts", "3", "--steps", "2", "--pass1-prompts", "1",
             "--device", "cpu"]

    first = _run(["-c", _INTERRUPTED_CALIBRATION, model, str(prompts), str(stats)], seed=1, check=False)
    assert first.returncode == 7, first.stderr[-2000:]
    manifest = json.loads((stats / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["pass1"]["batches_done"] == 1

    _run(["-m", "slimdiff.cli", "calibrate", "--model", model, *flags, "--out", str(stats)], seed=2)
    manifest = json.loads((stats / "manifest.json").read_text())
    assert manifest["complete"]

    _run(["-m", "slimdiff.cli", "slim", "--model", model, "--stats", str(stats), "--budget", "0.3",
          "--out", str(out)], seed=3)
    assert (out / "slimdiff_plan.json").is_file()
