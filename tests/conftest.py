import os
from collections import Counter

import pytest
import torch

from slimdiff.export.cache import CACHE_VARIABLE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist runs one process per worker: they share the CPUs instead of each taking all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _WORKERS)))


# Test files that read one export made once per test run (tests/export_support.py), by the export they read. Under
# pytest-xdist each group is one unit of work on one worker, which makes its export once while the other worker runs
# other files; split over two workers, the second file's worker would wait idle on the export's file lock.
SHARED_EXPORT_GROUPS = {
    "test_export_cli.py": "slimdiff-export", "test_triton.py": "slimdiff-export",
    "test_engines.py": "tiny-onnx-exports", "test_export_onnx.py": "tiny-onnx-exports",
    "test_runtime.py": "tiny-onnx-exports",
}


def _work_unit(test_file: str) -> str:
    """The unit of work a test file belongs to: its group above, or the file itself."""
    return SHARED_EXPORT_GROUPS.get(test_file.rsplit("/", 1)[-1], test_file)


def pytest_collection_modifyitems(items):
    """Longest work first: the units of work with the most tests marked slow (an export, a compile, separate
    processes) run first, then the others by their number of tests. pytest-xdist hands units to the workers in this
    order (``--no-loadscope-reorder``), so a run does not end with one worker busy for minutes while the other idles.
    The sort is stable, and a unit's tests stay together in their order."""
    units = {item: _work_unit(item.nodeid.split("::", 1)[0]) for item in items}
    slow = Counter(units[item] for item in items if item.get_closest_marker("slow"))
    size = Counter(units.values())
    items.sort(key=lambda item: (-slow[units[item]], -size[units[item]], units[item]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the groups above: a test file is one unit of work (its module fixtures are built
    once), the files of one group one unit together. (xdist's own ``--dist loadgroup`` would say this with marks, but
    it no longer groups under pytest 9.2: pytest-xdist issue 1386.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedExportScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(super()._split_scope(nodeid))

    return SharedExportScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory):
    """One ONNX export cache for the whole test run (``SLIMDIFF_EXPORT_CACHE``; commands the tests start inherit
    it): many tests export the same seeded component — builtin:tiny's text encoder and VAE in every repository — and
    each export costs tens of seconds. Each distinct export still runs once; ``test_export_cache.py`` tests the
    cache."""
    from export_support import shared_folder

    folder = shared_folder(tmp_path_factory) / "export-cache"
    own = os.environ.get(CACHE_VARIABLE)  # a developer's own cache: not used by the tests, set again after
    os.environ[CACHE_VARIABLE] = str(folder)
    yield folder
    if own is None:
        os.environ.pop(CACHE_VARIABLE, None)
    else:
        os.environ[CACHE_VARIABLE] = own


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


@pytest.fixture(scope="module")
def noise_images(tmp_path_factory):
    """A folder of three seeded noise images, each of another size unlike the calibration sizes (the pipelines
    resize them): what the image-taking families calibrate on in tests (FLUX Fill's holes, FLUX Control's maps)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("noise-images")
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder
