"""New weights into a served Triton repository: a model's engine written again with the weights of a PyTorch model
of the same architecture (another LoRA fused, a fine-tune of the same shapes) as that model's next version.

Triton serves a model's newest version when its config sets no version policy (``slimdiff-export --triton-repo``
sets none): a server started with ``--model-control-mode=poll`` switches to the new version by itself, one with
``explicit`` on a load request for the model, and the repository's pipeline calls whichever version is served. The
version is written from the engine folder ``slimdiff-export`` built (it keeps the source export and the weights record
an update needs; a repository's version folder holds the engine alone), without an export: ONNX Runtime builds its
engine again from a copy of the source export holding the new weights, TensorRT refits an engine built refittable and
serializes it. AOTInductor packages take new weights in a running process only.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..engines import get, load_engine_meta
from ..engines.base import engine_meta_path
from ..engines.triton import add_engine_version, served_engine_meta
from ..engines.weights import weights_path
from ..errors import SlimDiffError
from ..export.meta import files_size, write_json_atomic
from .unet import engine_class


def add_weights_version(repo: str | Path, model: str, engine_folder: str | Path, module: torch.nn.Module) -> Path:
    """Add to ``model`` of the Triton repository ``repo`` a version serving its engine with the weights of ``module``
    — a PyTorch denoiser (or ControlNet) of the architecture, and for a slim engine the rank plan, the engine was
    exported from. ``engine_folder`` is the engine folder the repository's model was built from (``OUT/slim``,
    ``OUT/dense``); returns the new version's folder.

    Refused in one line before anything is written: a model or engine folder that is not the other's, an engine that
    cannot take new weights, and what :meth:`~slimdiff.runtime.EngineUNet.load_weights_from` refuses."""
    served = served_engine_meta(Path(repo), model)
    meta, folder = load_engine_meta(Path(engine_folder), served["component"])
    if (meta["engine"], meta.get("source_onnx")) != (served["engine"], served.get("source_onnx")):
        raise SlimDiffError(f"{str(engine_folder)!r} holds another engine than model {model!r} of {str(repo)!r} "
                            "serves: give the engine folder the repository was written from")
    if meta.get("weights") and not weights_path(folder, meta["component"]).is_file():
        raise SlimDiffError(f"{str(engine_folder)!r} lacks the engine's weights record: give the engine folder "
                            "slimdiff-export built (a repository's version folder holds the engine alone)")
    reason = get(meta["engine"]).cannot_write_with_weights(meta)
    if reason:
        raise SlimDiffError(reason)
    state = engine_class(meta).exported_state(meta, folder, module)
    # inside the model folder: a folder not named by a number is no version to Triton (beside it, one more model)
    staged = Path(tempfile.mkdtemp(prefix=".new-weights-", dir=Path(repo) / model))
    try:
        with torch.no_grad():
            runtime = get(meta["engine"]).write_with_weights(meta, folder, state, staged)
        files = runtime.pop("files")
        written = {**meta, "file": files[0], "files": files, "size_bytes": files_size([staged / f for f in files]),
                   "runtime": runtime}
        write_json_atomic(engine_meta_path(staged, meta["component"]), written)
        return add_engine_version(Path(repo), model, written, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
