"""The python-backend models of a slimdiff Triton repository (see :mod:`slimdiff.engines.triton`), and the same text-to-image
pipeline in-process.

* :class:`EngineModel` serves one engine folder (``python`` mode): the requests Triton's dynamic batcher hands
  over together are concatenated along the batch axis when their other dimensions agree, run as one call, and
  split again.
* :class:`PipelineModel` is prompt in, image out: diffusers' own ``StableDiffusionPipeline`` loop (tokenizer,
  scheduler, classifier-free guidance) whose text encoder, UNet and VAE decoder are stand-ins that call the
  repository's three models through Triton's BLS (business logic scripting). Running the unchanged diffusers loop
  is what makes a served image equal to the in-process one for the same seed.

``triton_python_backend_utils`` exists only inside Triton's python backend; it is imported there, lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..engines import Runner, load_engine_meta, open_engine
from ..engines.triton import batch_dims
from ..errors import SlimDiffError
from .unet import EngineUNet

#: The image of a request that names no size or seed.
DEFAULTS = {"negative_prompt": None, "seed": 0, "steps": 25, "guidance_scale": 7.5, "height": None, "width": None}


def _pb_utils():
    import triton_python_backend_utils  # provided by Triton's python backend stub

    return triton_python_backend_utils


class BlsRunner:
    """A :class:`~slimdiff.engines.Runner` that calls model ``name`` of the running Triton server."""

    def __init__(self, name: str, meta: dict):
        self.name = name
        self.device = torch.device("cpu")  # BLS tensors travel as host arrays here
        self.dtype = getattr(torch, meta["dtype"])
        self.output = meta["output"]
        _, shapes = batch_dims(meta)
        # Per-item scalars (the timestep) are declared [1] to Triton: (batch,) goes out as (batch, 1).
        self.inputs = [(i["name"], shapes[i["name"]] == []) for i in meta["inputs"]]

    def run(self, inputs: list[torch.Tensor], out_shape: tuple | None = None) -> torch.Tensor:
        pb = _pb_utils()
        tensors = [pb.Tensor(name, (t.reshape(-1, 1) if scalar else t).cpu().numpy())
                   for (name, scalar), t in zip(self.inputs, inputs)]
        response = pb.InferenceRequest(model_name=self.name, inputs=tensors,
                                       requested_output_names=[self.output]).exec()
        if response.has_error():
            raise SlimDiffError(f"Triton model {self.name!r} failed: {response.error().message()}")
        return torch.from_numpy(np.array(pb.get_output_tensor_by_name(response, self.output).as_numpy()))


class _Component(torch.nn.Module):
    """What diffusers reads off a pipeline component besides calling it: ``config``, ``dtype``, ``device``."""

    def __init__(self, config, runner: Runner):
        super().__init__()
        self.config = config
        self.runner = runner

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the pipeline's latents and embeddings; engines cast on the way in

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner.run([x.to(self.runner.dtype if x.is_floating_point() else torch.int64)], None).float()


class TextEncoderStandIn(_Component):
    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, **kwargs):
        if output_hidden_states:
            raise SlimDiffError("the served text encoder returns its last hidden state only (no clip_skip)")
        return (self._run(input_ids),)


class VaeDecoderStandIn(_Component):
    def decode(self, z, return_dict: bool = True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        image = self._run(z)
        return DecoderOutput(sample=image) if return_dict else (image,)


def repository_pipeline(version: Path, runner_for: Callable[[str, dict], Runner]):
    """The ``StableDiffusionPipeline`` of a repository's ``pipeline/1`` folder, its models run by
    ``runner_for(model name, engine metadata)`` (BLS inside Triton; local engines in-process)."""
    import diffusers
    import transformers
    from diffusers.configuration_utils import FrozenDict

    version = Path(version)
    metas = {name: json.loads((version / f"{name}.engine.json").read_text(encoding="utf-8"))
             for name in ("text_encoder", "unet", "vae_decoder")}
    tokenizer_class = json.loads((version / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"]
    scheduler_class = json.loads((version / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    text_config = transformers.CLIPTextConfig.from_pretrained(version / "text_encoder")
    vae_config = FrozenDict(diffusers.AutoencoderKL.load_config(version / "vae"))
    pipe = diffusers.StableDiffusionPipeline(
        vae=VaeDecoderStandIn(vae_config, runner_for("vae_decoder", metas["vae_decoder"])),
        text_encoder=TextEncoderStandIn(text_config, runner_for("text_encoder", metas["text_encoder"])),
        tokenizer=getattr(transformers, tokenizer_class).from_pretrained(version / "tokenizer"),
        unet=EngineUNet(runner_for("unet", metas["unet"]), metas["unet"], version),
        scheduler=getattr(diffusers, scheduler_class).from_pretrained(version / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def local_runners(repo: Path) -> Callable[[str, dict], Runner]:
    """Runners over a ``python``-mode repository's engine folders, in this process."""
    def runner_for(name: str, meta: dict) -> Runner:
        return open_engine(*load_engine_meta(Path(repo) / name / "1", meta["component"]))

    return runner_for


def generate(pipe, prompt: str, **options) -> np.ndarray:
    """One image, HxWx3 uint8, for ``prompt`` with :data:`DEFAULTS` overridden by ``options``."""
    o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    image = pipe(prompt, negative_prompt=o["negative_prompt"], num_inference_steps=int(o["steps"]),
                 guidance_scale=float(o["guidance_scale"]), height=o["height"], width=o["width"],
                 generator=torch.Generator().manual_seed(int(o["seed"])), output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil


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
                out = self.runner.run([t.to(self.runner.device) for t in batch], None).cpu().numpy()
                sizes = np.cumsum([arrays[i][0].shape[0] for i in members])[:-1]
                for i, part in zip(members, np.split(out, sizes)):
                    responses[i] = pb.InferenceResponse([pb.Tensor(self.meta["output"], part)])
            except Exception as exc:  # one failing group answers its own requests with the error
                for i in members:
                    responses[i] = pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}"))
        return responses


class PipelineModel:
    """Triton python-backend model: prompt in, image out."""

    def initialize(self, args):
        self.pipe = repository_pipeline(Path(args["model_repository"]) / args["model_version"], BlsRunner)

    def execute(self, requests):
        pb = _pb_utils()
        responses = []
        for request in requests:
            try:
                def value(name):
                    t = pb.get_input_tensor_by_name(request, name)
                    if t is None:
                        return None
                    v = t.as_numpy().reshape(-1)[0]
                    return v.decode("utf-8") if isinstance(v, bytes) else v.item()

                image = generate(self.pipe, value("prompt"), **{k: value(k) for k in DEFAULTS})
                responses.append(pb.InferenceResponse([pb.Tensor("image", image)]))
            except Exception as exc:
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses
