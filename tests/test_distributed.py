"""Calibration with torch.distributed: two gloo processes on loopback (torchrun) give the single-process
statistics bit for bit, through the CLI and after a rank is killed mid-run and the job restarted."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimdiff.calibrate import CalibrationConfig, Statistics, calibrate
from slimdiff.errors import SlimDiffError
from slimdiff.models import build_builtin
from slimdiff.prompts import read_prompts

HERE = Path(__file__).parent
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """torchrun with 2 CPU processes on loopback; the whole process group is killed if it overruns."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _single_process(prompts, config) -> Statistics:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun worker (OMP_NUM_THREADS=1): same float32 kernels
    try:
        return calibrate(build_builtin("builtin:tiny"), prompts, None, config, progress=False)
    finally:
        torch.set_num_threads(threads)


def _assert_identical(got: Statistics, want: Statistics) -> None:
    assert got.timesteps == want.timesteps and got.visits == want.visits
    assert set(got.tensors) == set(want.tensors) and set(got.timestep_weights) == set(want.timestep_weights)
    for key, value in want.tensors.items():
        assert torch.equal(got.tensors[key], value), key
    for key, value in want.timestep_weights.items():
        assert torch.equal(got.timestep_weights[key], value), key


@pytest.mark.slow
def test_torchrun_calibrate_matches_one_process(tmp_path):
    prompts = read_prompts(limit=5)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    run = _torchrun("-m", "slimdiff", "calibrate", "--model", "builtin:tiny", "--device", "cpu",
                    "--prompts", str(tmp_path / "prompts.txt"), "--num-prompts", "5", "--steps", "3",
                    "--pass1-prompts", "3", "--checkpoint-every", "1", "--out", str(tmp_path / "stats"))
    assert run.returncode == 0, run.stdout
    assert "by 2 processes" in run.stdout
    assert not (tmp_path / "stats" / "chunks").exists()
    config = CalibrationConfig(steps=3, pass1_prompts=3, checkpoint_every=1)
    _assert_identical(Statistics.load(tmp_path / "stats"), _single_process(prompts, config))


@pytest.mark.slow
def test_killed_rank_resumes_to_identical_statistics(tmp_path):
    from distributed_worker import CONFIG

    out, log = tmp_path / "stats", tmp_path / "seeds"
    worker = [str(HERE / "distributed_worker.py"), "--out", str(out), "--prompts", "6", "--seed-log", str(log)]
    # One prompt per chunk. Pass 1 deals chunks {0, 1}; pass 2 deals {0, 1}, {2, 3}, {4, 5}: rank 1 dies on
    # seed 3 once rank 0 has finished chunk 2 (kept on disk until folded).
    killed = _torchrun(*worker, "--kill-rank", "1", "--kill-seed", "3",
                       "--kill-when-exists", str(out / "chunks" / "pass2-000002.safetensors"))
    assert killed.returncode != 0, killed.stdout
    with pytest.raises(SlimDiffError, match="incomplete"):
        Statistics.load(out)
    resumed = _torchrun(*worker)
    assert resumed.returncode == 0, resumed.stdout
    _assert_identical(Statistics.load(out), _single_process(read_prompts(limit=6), CONFIG))
    # Rank 0 sampled seed 0 in each pass and seed 2 once: the restart resumed after the checkpointed round
    # {0, 1} and took chunk 2 from disk; rank 1 sampled seed 3 only after the restart.
    rank0 = (log.parent / f"{log.name}.0").read_text().split()
    rank1 = (log.parent / f"{log.name}.1").read_text().split()
    assert (rank0.count("0"), rank0.count("2"), rank0.count("4")) == (2, 1, 1), rank0
    assert (rank1.count("1"), rank1.count("3"), rank1.count("5")) == (2, 1, 1), rank1
