"""The python-backend model serving one engine folder of a slimdiff Triton repository (``python`` mode; see
:mod:`slimdiff.engines.triton`): the requests Triton's dynamic batcher hands over together are concatenated along
the batch axis when their other dimensions agree, run as one call, and split again (every output of an engine with
several).

Each model of a python-backend repository runs in a stub process of its own, and a repository serves three to six
engines beside its pipeline: this module imports torch, numpy and the engine runtime only — not diffusers,
transformers or the pipelines (:mod:`slimdiff.runtime.triton_models`), which would cost every engine's stub seconds
to start and hundreds of MB to hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import SlimDiffError
from .base import engine_outputs, load_engine_meta, open_engine


def _pb_utils():
    import triton_python_backend_utils  # provided by Triton's python backend stub

    return triton_python_backend_utils


class EngineModel:
    """Triton python-backend model serving the engine folder in its version directory."""

    def initialize(self, args):
        version = Path(args["model_repository"]) / args["model_version"]
        found = sorted(version.glob("*.engine.json"))
        if len(found) != 1:
            raise SlimDiffError(f"{version} must hold exactly one *.engine.json, found {len(found)}")
        meta, folder = load_engine_meta(found[0])
        self.runner = open_engine(meta, folder)
        self.meta = meta
        self.outputs = [o["name"] for o in engine_outputs(meta)]

    def execute(self, requests):
        pb = _pb_utils()
        arrays = []
        for request in requests:
            item = []
            for spec in self.meta["inputs"]:
                a = pb.get_input_tensor_by_name(request, spec["name"]).as_numpy()
                item.append(a.reshape(-1) if len(spec["dims"]) == 1 else a)  # (batch, 1) -> (batch,)
            arrays.append(item)
        responses = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(arrays):
            groups.setdefault(tuple(a.shape[1:] for a in item), []).append(i)
        for members in groups.values():
            try:
                batch = [torch.from_numpy(np.concatenate([arrays[i][k] for i in members]))
                         for k in range(len(self.meta["inputs"]))]
                batch = [t.to(self.runner.device) for t in batch]
                outs = self.runner.run_outputs(batch) if len(self.outputs) > 1 else [self.runner.run(batch, None)]
                sizes = np.cumsum([arrays[i][0].shape[0] for i in members])[:-1]
                parts = [np.split(out.cpu().numpy(), sizes) for out in outs]
                for k, i in enumerate(members):
                    responses[i] = pb.InferenceResponse([pb.Tensor(name, part[k])
                                                         for name, part in zip(self.outputs, parts)])
            except Exception as exc:  # one failing group answers its own requests with the error
                for i in members:
                    responses[i] = pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}"))
        return responses
