import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist runs one process per worker: they share the CPUs instead of each taking all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _WORKERS)))


@pytest.fixture
def tiny_pipe():
    """A fresh built-in tiny pipeline (tests may slim its UNet in place)."""
    from slimdiff.models import build_builtin

    return build_builtin("builtin:tiny")


@pytest.fixture(scope="session")
def tiny_stats():
    """Calibration statistics of builtin:tiny over a few prompts and steps (shared, read-only)."""
    from slimdiff.calibrate import CalibrationConfig, calibrate
    from slimdiff.models import build_builtin
    from slimdiff.prompts import read_prompts

    pipe = build_builtin("builtin:tiny")
    config = CalibrationConfig(steps=4, pass1_prompts=2, batch_size=2)
    return calibrate(pipe, read_prompts(limit=6), None, config, progress=False)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """The tiny dense UNet exported to ONNX once per session: (ONNX path, sidecar, UNet)."""
    from export_support import cached_export

    return cached_export(tmp_path_factory, "dense")


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    """The tiny slim UNet exported to ONNX once per session: (ONNX path, sidecar, UNet)."""
    from export_support import cached_export

    return cached_export(tmp_path_factory, "slim")
