"""A Triton Inference Server model repository from built engines, and a local server to try it on.

Layout written by :func:`write_repository` (``slimdiff-export ... --triton-repo DIR``)::

    DIR/unet/config.pbtxt            platform "tensorrt_plan" | backend "onnxruntime" | backend "python"
    DIR/unet/engine.json             the engine metadata (TensorRT version and GPU, profiles, signature...)
    DIR/unet/1/model.plan | model.onnx (+ external data) | the engine folder + model.py (python backend)
                                     (the denoiser is named after the family's component: DIR/transformer/ for DiTs)
    DIR/text_encoder/...             the same for each text encoder the family serves (SDXL, FLUX: text_encoder_2
                                     too; SD3: text_encoder_2 and text_encoder_3)
    DIR/vae_decoder/...              the same for the VAE decoder
    DIR/vae_encoder/...              inpainting pipelines, FLUX Control and ControlNet, --triton-img2img: the VAE
                                     encoder too (an image's latent)
    DIR/controlnet/...               ControlNet pipelines: the ControlNet's engine (its residuals feed the UNet's;
                                     FLUX's: its block samples feed the transformer's)
    DIR/refiner_unet/...             --refiner: the SDXL refiner's UNet engine, run after the base on its latents
    DIR/pipeline/config.pbtxt        python backend: prompt (inpainting: and image, mask; ControlNet, FLUX Control:
                                     and control_image; --triton-img2img: and an optional image; --refiner: and an
                                     optional refiner_start) in, image out (tokenizers, scheduler, CFG), calling
    DIR/pipeline/1/model.py          the models above through Triton's BLS
    DIR/pipeline/1/pipeline.json     which diffusers pipeline runs the loop, its text encoders and their outputs
    DIR/pipeline/1/{tokenizer*,scheduler,text_encoder*,vae}/ and *.engine.json: what the loop needs (--refiner:
                                     refiner_scheduler/ and the refiner's pipeline class and options too)

What differs per model family comes from its :class:`~slimdiff.families.DenoiserFamily`: the pipeline class the
``pipeline`` model runs (:attr:`~slimdiff.families.DenoiserFamily.serving_pipeline`; SD-1.x/2.x:
``StableDiffusionPipeline``, SDXL: ``StableDiffusionXLPipeline``, PixArt-Σ: ``PixArtSigmaPipeline``, SD3:
``StableDiffusion3Pipeline``, FLUX: ``FluxPipeline`` (FLUX Fill: ``FluxFillPipeline``, FLUX Control:
``FluxControlPipeline``); with a ControlNet engine, SD's and SDXL's ControlNet pipelines
(their ControlNet inpainting pipelines for inpainting models) and FLUX's ``FluxControlNetPipeline``:
:attr:`~slimdiff.families.DenoiserFamily.serving_controlnet_pipeline`; for requests carrying an image, with
``--triton-img2img``, SD's, SDXL's, SD3's and FLUX's image-to-image pipelines:
:attr:`~slimdiff.families.DenoiserFamily.serving_img2img_pipeline`, and SD's and SDXL's ControlNet ones:
:attr:`~slimdiff.families.DenoiserFamily.serving_controlnet_img2img_pipeline`), the text encoders served, what each takes and
returns and the one prompt length its engine is built for
(:meth:`~slimdiff.families.DenoiserFamily.served_text_encoders`; SDXL's second: the penultimate hidden state and the
pooled ``text_embeds``; PixArt's T5 takes the tokenizer's ``attention_mask`` too, over the pipeline's 300 tokens;
FLUX's CLIP-L: its ``pooler_output``) and the pipeline's
other constructor options. The denoiser model is named after the family's component and takes the family's export
inputs (SDXL: ``text_embeds``, ``time_ids`` after the SD call; PixArt: ``encoder_attention_mask``; SD3:
``pooled_projections``; FLUX: the unpacked latent, ``pooled_projections`` and ``guidance``). The pipeline model
drives it through the engine-backed denoiser :func:`slimdiff.runtime.use_engine` installs (its call translation
included: FLUX's packed latents), over a BLS runner.

``config.pbtxt`` files are written from Triton's own protobuf schema (``tritonclient.grpc.model_config_pb2``)
with ``google.protobuf.text_format``. Each model's inputs and outputs are named, typed and shaped from the
engine's metadata: the batch axis becomes ``max_batch_size`` (the engine's largest batch) with dynamic
batching, axes whose range is one value stay fixed, the others are ``-1``; inputs that are only a batch
(``timestep``) are declared ``[1]`` and reshaped to ``[]``.

The ``python`` serving mode runs the engines with slimdiff inside Triton's python backend (any backend of
:mod:`slimdiff.engines` on the device it was built for; engines with several outputs on ONNX Runtime): it is what
a CPU-only ``tritonserver`` — such as the one bundled in the ``nvidia-pytriton`` wheel, with only the python
backend — can serve, and what the tests use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from ..errors import SlimDiffError
from ..export.meta import status
from .base import engine_meta_path, engine_outputs, get, load_engine_meta

MODES = ("native", "python")
PIPELINE = "pipeline"
#: What the ``pipeline`` model reads to build its diffusers pipeline (:func:`add_pipeline_model`).
PIPELINE_SPEC = "pipeline.json"
#: The ``pipeline`` model's optional inputs beside ``prompt``, with their Triton types.
PIPELINE_OPTIONS = {"negative_prompt": "BYTES", "seed": "INT64", "steps": "INT32", "guidance_scale": "FP32",
                    "height": "INT32", "width": "INT32"}
#: The images a request may carry, as uint8 arrays: an inpainting pipeline's (:attr:`~slimdiff.families.
#: DenoiserFamily.serving_image_inputs`: the image H×W×3 and its mask H×W, 255 where the pipeline paints), an
#: image-to-image request's starting image (H×W×3) and a ControlNet pipeline's conditioning image (H×W×3: edges, depth,
#: pose..., resized by the pipeline to the image's size).
IMAGE_INPUTS = {"image": [-1, -1, 3], "mask_image": [-1, -1], "control_image": [-1, -1, 3]}
#: The optional inputs an inpainting or image-to-image request takes beside :data:`PIPELINE_OPTIONS`.
IMAGE_OPTIONS = {"strength": "FP32"}
#: The optional inputs a ControlNet pipeline takes beside :data:`PIPELINE_OPTIONS`.
CONTROLNET_OPTIONS = {"controlnet_conditioning_scale": "FP32"}
#: The optional input of a repository serving a base model with its refiner (``--refiner``): the fraction of the
#: schedule the base runs before the refiner denoises its latents on (diffusers' ``denoising_end`` and
#: ``denoising_start``: the ensemble of expert denoisers).
REFINER_OPTIONS = {"refiner_start": "FP32"}
#: The model serving the refiner's UNet engine beside the base's.
REFINER = "refiner_unet"
#: The folder of ``pipeline/1`` holding the refiner's scheduler.
REFINER_SCHEDULER = "refiner_scheduler"
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                  "uint8": "TYPE_UINT8"}
_MODEL_PY = {
    "engine": "from slimdiff.engines.triton_engine_model import EngineModel as TritonPythonModel  # noqa: F401\n",
    PIPELINE: "from slimdiff.runtime.triton_models import PipelineModel as TritonPythonModel  # noqa: F401\n",
}


#: What a served pipeline does, and the family attribute naming its diffusers class.
TEXT_TO_IMAGE, WITH_CONTROLNET = "text-to-image", "controlnet"
IMAGE_TO_IMAGE, CONTROLNET_IMAGE_TO_IMAGE = "image-to-image", "controlnet-image-to-image"
ROLE_PIPELINE = {TEXT_TO_IMAGE: "serving_pipeline", WITH_CONTROLNET: "serving_controlnet_pipeline",
                 IMAGE_TO_IMAGE: "serving_img2img_pipeline",
                 CONTROLNET_IMAGE_TO_IMAGE: "serving_controlnet_img2img_pipeline"}
#: The image-to-image role served beside each role (``--triton-img2img``).
IMAGE_TO_IMAGE_BESIDE = {TEXT_TO_IMAGE: IMAGE_TO_IMAGE, WITH_CONTROLNET: CONTROLNET_IMAGE_TO_IMAGE}


@functools.lru_cache(maxsize=None)
def _call_takes(pipeline_class: str, argument: str) -> bool:
    """Whether diffusers' ``pipeline_class`` takes ``argument`` in its call (read once per class: asked per request)."""
    import inspect

    import diffusers

    return argument in inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters


@dataclasses.dataclass(frozen=True)
class ServedPipeline:
    """What a repository's ``pipeline`` model serves for a diffusers pipeline: its family, the class it runs and its
    role (:data:`ROLE_PIPELINE`: a ControlNet pipeline's requests carry ``control_image``, an image-to-image one's
    ``image``), and the image-to-image class the same model runs for requests that carry an image
    (``--triton-img2img``), if any."""

    family: object  # a DenoiserFamily
    pipeline_class: str
    role: str
    image_to_image_class: str | None = None
    refiner_class: str | None = None  # the refiner's pipeline run after this one on its latents (``--refiner``)

    @property
    def controlnet(self) -> bool:
        return self.role in (WITH_CONTROLNET, CONTROLNET_IMAGE_TO_IMAGE)

    @property
    def image_inputs(self) -> tuple[str, ...]:
        """The images every request of this pipeline carries (a ControlNet inpainting one: the image, its mask and
        the conditioning image; a FLUX ControlNet one the conditioning image, which its family's calibration takes
        too)."""
        with_controlnet = tuple(dict.fromkeys((*self.family.serving_image_inputs, "control_image")))
        return {WITH_CONTROLNET: with_controlnet, IMAGE_TO_IMAGE: ("image",),
                CONTROLNET_IMAGE_TO_IMAGE: ("image", "control_image")}.get(self.role, self.family.serving_image_inputs)

    def call_argument(self, image: str) -> str:
        """The diffusers call argument a request image is passed as: the conditioning image as ``control_image``
        where the pipeline's call takes one (SD's ControlNet image-to-image and inpainting pipelines, beside
        ``image``; FLUX's ControlNet and Control pipelines), else as ``image`` (SD's and SDXL's ControlNet
        text-to-image pipelines)."""
        if image != "control_image":
            return image
        return "control_image" if _call_takes(self.pipeline_class, "control_image") else "image"

    @property
    def request_images(self) -> dict[str, bool]:
        """Every image a request may carry, and whether it must: an image-to-image request's ``image`` is
        optional beside a text-to-image pipeline."""
        return {**dict.fromkeys(self.image_inputs, True), **({"image": False} if self.image_to_image_class else {})}

    @property
    def vae_encoder(self) -> bool:
        """Whether a VAE encoder is served: the pipeline encodes a request's image (inpainting, image-to-image, FLUX
        Control's conditioning image)."""
        return any(image in self.request_images for image in self.family.serving_encoded_images)

    @property
    def noises_image(self) -> bool:
        """Whether a request's ``image`` is noised to a strength: an inpainting pipeline's, the refiner's, an
        image-to-image request's — not FLUX Kontext's, which only conditions the sampling."""
        return "image" in self.request_images and (self.image_to_image_class is not None or self.role != TEXT_TO_IMAGE
                                                   or self.family.noises_image)

    @property
    def options(self) -> dict[str, str]:
        """The request's optional inputs with their Triton types (``strength`` where a request's image is noised)."""
        return {**PIPELINE_OPTIONS, **(CONTROLNET_OPTIONS if self.controlnet else {}),
                **(IMAGE_OPTIONS if self.noises_image else {}),
                **(REFINER_OPTIONS if self.refiner_class else {})}


def several_controlnets(pipe) -> bool:
    """Whether ``pipe`` holds several ControlNets (diffusers' ``MultiControlNetModel``, ``FluxMultiControlNetModel``...:
    their ``nets``), which no repository serves."""
    return hasattr(getattr(pipe, "controlnet", None), "nets")


def served_pipeline(pipe) -> ServedPipeline | None:
    """How a repository serves ``pipe``, or None when it cannot: a pipeline whose class is its family's
    :attr:`~slimdiff.families.DenoiserFamily.serving_pipeline`, or with one ControlNet its
    :attr:`~slimdiff.families.DenoiserFamily.serving_controlnet_pipeline`, or its
    :attr:`~slimdiff.families.DenoiserFamily.serving_img2img_pipeline`. SD's ControlNet and image-to-image pipelines
    are no family's own (those families are registered for their text-to-image classes): the family whose class it
    is and that accepts the pipeline's UNet serves it. ``FluxControlNetPipeline`` is its family's own, served as its
    ControlNet pipeline."""
    from ..families import FAMILIES, load_builtin

    if several_controlnets(pipe):
        return None
    load_builtin()
    for family in FAMILIES.adapters():
        for role, attribute in ROLE_PIPELINE.items():
            if getattr(family, attribute) == type(pipe).__name__ and family.accepts(pipe):
                return ServedPipeline(family, type(pipe).__name__, role)
    return None


def controlnet_pipeline(pipe, controlnet):
    """``pipe``'s family's ControlNet pipeline, sharing ``pipe``'s components, with ``controlnet``: what a repository
    serving a ControlNet is written from."""
    import diffusers

    served = check_pipeline(pipe)
    name = served.family.serving_controlnet_pipeline
    if name is None:
        from ..families import FAMILIES

        served_with = sorted({f.serving_controlnet_pipeline for f in FAMILIES.adapters() if f.serving_controlnet_pipeline})
        raise SlimDiffError(f"--triton-repo serves no ControlNet pipeline for {type(pipe).__name__} so far (it serves "
                            f"{', '.join(served_with)}: export such a pipeline's folder)")
    # from_pipe keeps a model component only when its class is the new pipeline's type hint exactly: a slim
    # denoiser (a subclass) is handed over by name
    denoiser = served.family.component
    return getattr(diffusers, name).from_pipe(pipe, controlnet=controlnet, **{denoiser: getattr(pipe, denoiser)})


def image_to_image_pipeline(pipe):
    """The image-to-image pipeline of a repository serving ``--triton-img2img`` beside the text-to-image ``pipe``,
    sharing its components (stand-ins included)."""
    import diffusers

    served = check_pipeline(pipe, image_to_image=True)
    # from_pipe keeps a model component only when its class is the new pipeline's type hint exactly: the denoiser (a
    # slim one is a subclass) and the engine-backed ControlNet (a ControlNetModel subclass) are handed over by name
    models = [served.family.component, *(["controlnet"] if served.controlnet else [])]
    return getattr(diffusers, served.image_to_image_class).from_pipe(pipe, **{m: getattr(pipe, m) for m in models})


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise SlimDiffError(f"writing a Triton repository needs tritonclient (pip install 'slimdiff[serve]'): {exc}") \
            from None
    return model_config_pb2, text_format


def check_mode(kind: str, mode: str) -> None:
    """Refuse a serving mode a backend cannot do, before any work."""
    if mode not in MODES:
        raise SlimDiffError(f"Triton serving mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not get(kind).from_onnx:
        raise SlimDiffError(f"Triton repositories are written for engines built from ONNX, not {kind} engines")
    if mode == "native" and get(kind).triton_model({}) is None:
        raise SlimDiffError(f"Triton has no native backend for {kind} engines; serve them with --triton-mode python")


def batch_dims(meta: dict) -> tuple[int, dict[str, list[int]]]:
    """``(max_batch_size, {tensor name: dims without the batch axis})`` for an engine: -1 for dynamic axes.
    ``max_batch_size`` is 0 (no batching) unless every input starts with the batch axis."""
    axes = meta["axes"]

    def dim(d):
        if isinstance(d, int):
            return d
        r = axes.get(d)
        return r["min"] if r and r["min"] == r["max"] else -1

    batched = "batch" in axes and all(i["dims"][:1] == ["batch"] for i in meta["inputs"])
    shapes = {i["name"]: [dim(d) for d in (i["dims"][1:] if batched else i["dims"])] for i in meta["inputs"]}
    for output in engine_outputs(meta):
        out = output["dims"]
        if out is None:
            raise SlimDiffError(f"{meta['engine']} engine metadata records no output shape; rebuild it with this "
                                "slimdiff")
        shapes[output["name"]] = [-1 if isinstance(d, str) else d for d in (out[1:] if batched else out)]
    return (axes["batch"]["max"] if batched else 0), shapes


def model_config(name: str, meta: dict, mode: str, *, dynamic_batching: bool = True, instances: int = 1):
    """The ``ModelConfig`` protobuf for engine ``meta`` served as ``mode``."""
    pb, _ = _pb()
    config = pb.ModelConfig(name=name)
    if mode == "python":
        config.backend = "python"
    else:
        native = get(meta["engine"]).triton_model(meta)
        config.platform, config.backend = native.platform, native.backend
        config.default_model_filename = native.model_file
    max_batch, shapes = batch_dims(meta)
    config.max_batch_size = max_batch
    outputs = [o["name"] for o in engine_outputs(meta)]
    dtypes = {i["name"]: i["dtype"] for i in meta["inputs"]} | dict.fromkeys(outputs, meta["dtype"])
    for tensors, names in ((config.input, [i["name"] for i in meta["inputs"]]), (config.output, outputs)):
        for tensor_name in names:
            t = tensors.add(name=tensor_name, data_type=getattr(pb, _TRITON_DTYPES[dtypes[tensor_name]]))
            dims = shapes[tensor_name]
            t.dims.extend(dims or [1])
            if not dims:  # a per-item scalar (the timestep): Triton wants a dimension, the engine has none
                t.reshape.SetInParent()
    group = config.instance_group.add(count=instances)
    group.kind = pb.ModelInstanceGroup.KIND_GPU if str(meta["device"]).startswith("cuda") else \
        pb.ModelInstanceGroup.KIND_CPU
    if max_batch and dynamic_batching:
        config.dynamic_batching.SetInParent()
    return config


def pipeline_config(served: ServedPipeline, *, instances: int):
    pb, _ = _pb()
    config = pb.ModelConfig(name=PIPELINE, backend="python", max_batch_size=0)
    config.input.add(name="prompt", data_type=pb.TYPE_STRING, dims=[1])
    for name, required in served.request_images.items():
        config.input.add(name=name, data_type=pb.TYPE_UINT8, dims=IMAGE_INPUTS[name], optional=not required)
    for name, dtype in served.options.items():
        config.input.add(name=name, data_type=getattr(pb, "TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}"),
                         dims=[1], optional=True)
    config.output.add(name="image", data_type=pb.TYPE_UINT8, dims=[-1, -1, 3])
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    return config


def request_image(client, prompt: str, seed: int, steps: int, **options):
    """Ask the repository's ``pipeline`` model for one image (``uint8`` H×W×3) through a ``tritonclient.http``
    ``InferenceServerClient``; ``options`` are more of :data:`PIPELINE_OPTIONS` (``height=16``...) and, for an
    inpainting, image-to-image or ControlNet repository, its :data:`IMAGE_INPUTS` (uint8 arrays) and
    :data:`IMAGE_OPTIONS` or :data:`CONTROLNET_OPTIONS`, and :data:`REFINER_OPTIONS` for one serving a refiner; the
    optional inputs left out take the model's defaults."""
    import numpy as np
    import tritonclient.http as httpclient

    numpy_types = {"BYTES": object, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}
    known = {**PIPELINE_OPTIONS, **IMAGE_OPTIONS, **CONTROLNET_OPTIONS, **REFINER_OPTIONS}
    unknown = sorted(set(options) - set(known) - set(IMAGE_INPUTS))
    if unknown:
        raise SlimDiffError(f"the pipeline model takes no {', '.join(unknown)} "
                            f"(it takes {', '.join([*known, *IMAGE_INPUTS])})")
    inputs = []
    for name, value in {"prompt": prompt, "seed": seed, "steps": steps, **options}.items():
        if name in IMAGE_INPUTS:
            array, dtype = np.ascontiguousarray(value, dtype=np.uint8), "UINT8"
        else:
            dtype = known.get(name, "BYTES")
            array = np.array([value], dtype=numpy_types[dtype])
        tensor = httpclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(PIPELINE, inputs).as_numpy("image")


def write_config(path: Path, config) -> None:
    _, text_format = _pb()
    Path(path).write_text(text_format.MessageToString(config), encoding="utf-8")


def read_config(path: Path):
    """A ``config.pbtxt`` parsed back into Triton's ``ModelConfig`` (raises on anything Triton would not parse)."""
    pb, text_format = _pb()
    try:
        return text_format.Parse(Path(path).read_text(encoding="utf-8"), pb.ModelConfig())
    except text_format.ParseError as exc:
        raise SlimDiffError(f"{str(path)!r} is not a valid Triton model configuration: {exc}") from None


def _write_version(version: Path, meta: dict, folder: Path, mode: str) -> None:
    """The version folder of a model serving the engine of ``meta`` in ``folder``."""
    version.mkdir(parents=True)
    if mode == "python":
        for f in meta["files"]:
            shutil.copy2(folder / f, version / f)
        shutil.copy2(engine_meta_path(folder, meta["component"]), engine_meta_path(version, meta["component"]))
        (version / "model.py").write_text(_MODEL_PY["engine"], encoding="utf-8")
    else:
        native = get(meta["engine"]).triton_model(meta)
        shutil.copy2(folder / meta["file"], version / native.model_file)
        for f in meta["files"][1:]:  # external data keeps the name the graph refers to
            shutil.copy2(folder / f, version / f)


def model_versions(model: Path) -> list[int]:
    """The version numbers of a repository's model folder, in order (Triton ignores folders not named by one)."""
    return sorted(int(p.name) for p in Path(model).iterdir() if p.is_dir() and p.name.isdecimal())


def latest_version(model: Path) -> Path:
    """The version folder Triton serves of a model whose config sets no version policy: the newest."""
    versions = model_versions(model)
    if not versions:
        raise SlimDiffError(f"{str(model)!r} holds no model version (a folder named 1, 2, ...)")
    return Path(model) / str(versions[-1])


def served_engine_meta(repo: Path, name: str) -> dict:
    """The engine metadata of model ``name`` of a repository :func:`write_repository` wrote."""
    path = Path(repo) / name / "engine.json"
    if not path.is_file():
        raise SlimDiffError(f"{str(Path(repo) / name)!r} is no engine model of a slimdiff Triton repository "
                            "(no engine.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def add_engine_version(repo: Path, name: str, meta: dict, folder: Path) -> Path:
    """Add the engine of ``meta`` in ``folder`` to model ``name`` as its next version — the newest, which Triton
    serves (loaded by a server polling the repository, or on an explicit load) — in the serving mode of its
    versions before; returns the version folder. Written beside it and renamed, so a server never loads half a
    version."""
    model = Path(repo) / name
    latest = latest_version(model)
    mode = "python" if (latest / "model.py").is_file() else "native"
    version = model / str(int(latest.name) + 1)
    staged = model / f".{version.name}.partial-{os.getpid()}"  # not a number: Triton ignores it
    shutil.rmtree(staged, ignore_errors=True)
    try:
        _write_version(staged, meta, folder, mode)
        try:
            if version.exists():  # a rename onto an empty folder would replace it
                raise FileExistsError(version)
            staged.rename(version)
        except OSError as exc:
            raise SlimDiffError(f"{str(version)!r} was written by someone else meanwhile: add the version again") from exc
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return version


def add_engine_model(repo: Path, name: str, engine_folder: Path, component: str, mode: str, *,
                     dynamic_batching: bool = True, instances: int = 1) -> dict:
    """Add model ``name`` serving the ``component`` engine in ``engine_folder``; returns its metadata."""
    meta, folder = load_engine_meta(engine_folder, component)
    model = Path(repo) / name
    _write_version(model / "1", meta, folder, mode)
    (model / "engine.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    write_config(model / "config.pbtxt", model_config(name, meta, mode, dynamic_batching=dynamic_batching,
                                                      instances=instances))
    return meta


def add_pipeline_model(repo: Path, pipe, metas: dict[str, dict], *, instances: int,
                       image_to_image: bool = False, refiner=None) -> None:
    """The python-backend ``pipeline`` model and what its loop needs: the family's pipeline class, text encoders
    and constructor options (``pipeline.json``), tokenizers, scheduler, the text encoders' and VAE's configs, and
    the metadata of the engine models (names, dtypes, shapes, the denoiser's and the ControlNet's configs), the
    image-to-image class it runs for requests carrying an image when ``image_to_image``, and the ``refiner``
    pipeline's class, scheduler and options when it serves one (its UNet's engine metadata among ``metas``)."""
    from ..families import family_for

    served = check_pipeline(pipe, image_to_image=image_to_image, refiner=refiner)
    family = served.family
    version = Path(repo) / PIPELINE / "1"
    version.mkdir(parents=True)
    towers = family.served_text_encoders(pipe)
    for tower in towers:
        getattr(pipe, tower.name).config.save_pretrained(version / tower.name)
    for tokenizer in dict.fromkeys(t.tokenizer for t in towers):
        getattr(pipe, tokenizer).save_pretrained(version / tokenizer)
    pipe.scheduler.save_pretrained(version / "scheduler")
    pipe.vae.save_config(version / "vae")
    for name, meta in metas.items():
        (version / f"{name}.engine.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    spec = {"pipeline_class": served.pipeline_class, "denoiser": family.component,
            "text_encoders": [{"name": t.name, "tokenizer": t.tokenizer, "outputs": list(t.outputs),
                               "attention_mask": t.attention_mask} for t in towers],
            "options": family.serving_options(pipe), "image_inputs": list(served.image_inputs),
            "vae_encoder": served.vae_encoder, "controlnet": served.controlnet,
            "image_to_image": served.image_to_image_class, "refiner": None}
    if refiner is not None:
        # the refiner shares the base's second text tower and VAE stand-ins: its own scheduler and options only
        refiner.scheduler.save_pretrained(version / REFINER_SCHEDULER)
        spec["refiner"] = {"pipeline_class": served.refiner_class, "denoiser": REFINER,
                           "scheduler": REFINER_SCHEDULER, "options": family_for(refiner).serving_options(refiner)}
    (version / PIPELINE_SPEC).write_text(json.dumps(spec, indent=1), encoding="utf-8")
    (version / "model.py").write_text(_MODEL_PY[PIPELINE], encoding="utf-8")
    write_config(Path(repo) / PIPELINE / "config.pbtxt",
                 pipeline_config(served, instances=instances))


def served_pipelines() -> list[str]:
    """The diffusers pipeline classes a repository's ``pipeline`` model runs (those the families declare)."""
    from ..families import FAMILIES, load_builtin

    load_builtin()
    return sorted({getattr(f, attribute) for f in FAMILIES.adapters() for attribute in ROLE_PIPELINE.values()
                   if getattr(f, attribute)})


def check_pipeline(pipe, kind: str | None = None, mode: str | None = None, *,
                   image_to_image: bool = False, refiner=None) -> ServedPipeline:
    """Refuse, in one line and before any work, a pipeline the repository cannot serve (with ``kind`` engines in
    serving ``mode``, when given; with image-to-image requests too, when ``image_to_image``; followed by the
    ``refiner`` pipeline, when given); returns how it is served."""
    from ..export.modules import CONTROLNET
    from ..families import FAMILIES

    if pipe is None:
        raise SlimDiffError("--triton-repo needs the whole pipeline, not a denoiser alone")
    served = served_pipeline(pipe)
    if served is None:
        multi = " with several ControlNets" if several_controlnets(pipe) else ""
        raise SlimDiffError(f"--triton-repo serves {', '.join(served_pipelines())} so far, not "
                            f"{type(pipe).__name__}{multi}")
    family = served.family
    several = [t.name for t in family.served_text_encoders(pipe) if len(t.outputs) > 1] + \
        ([CONTROLNET] if served.controlnet else [])
    if mode == "python" and kind is not None and several and not get(kind).runs_several_outputs:
        raise SlimDiffError(f"{type(pipe).__name__}'s {', '.join(several)} returns several outputs, which slimdiff's "
                            f"{kind} runner does not: serve {kind} engines with --triton-mode native, or python mode "
                            "with --engine ort")
    if image_to_image:
        if "image" in served.image_inputs:  # an inpainting pipeline, the SDXL refiner
            raise SlimDiffError(f"a {served.pipeline_class} request carries an image already: leave out "
                                "--triton-img2img")
        role = IMAGE_TO_IMAGE_BESIDE.get(served.role)
        name = getattr(family, ROLE_PIPELINE[role]) if role else None
        if name is None:
            beside = sorted(f"{getattr(f, ROLE_PIPELINE[img2img])} beside {getattr(f, ROLE_PIPELINE[main])}"
                            for f in FAMILIES.adapters() for main, img2img in IMAGE_TO_IMAGE_BESIDE.items()
                            if getattr(f, ROLE_PIPELINE[img2img]))
            raise SlimDiffError(f"--triton-img2img serves {', '.join(beside)} so far, not image-to-image requests "
                                f"beside {type(pipe).__name__}")
        served = dataclasses.replace(served, image_to_image_class=name)
    if refiner is not None:
        served = dataclasses.replace(served, refiner_class=_check_refiner(served, pipe, refiner))
    return served


def _check_refiner(served: ServedPipeline, pipe, refiner) -> str:
    """The class of the ``refiner`` pipeline a repository runs after ``pipe`` on its latents; one line where the
    family has no refiner, ``refiner`` is not its refiner, or its second text tower or VAE is not shaped as the
    base's (the repository serves the base's to both, as diffusers' ensemble example shares them). Weights that
    differ are said in a warning: the base's serve."""
    import warnings

    import torch

    from ..errors import SlimDiffWarning
    from ..families import family_for

    wanted = served.family.serving_refiner_family
    if wanted is None or served.role != TEXT_TO_IMAGE or served.image_to_image_class:
        what = f"{served.pipeline_class} with image-to-image requests" if served.image_to_image_class else \
            served.pipeline_class
        raise SlimDiffError(f"--refiner continues an SDXL base's text-to-image latents; a repository serving {what} "
                            "takes no refiner")
    family = family_for(refiner)
    if family.name != wanted:
        raise SlimDiffError(f"--refiner is a {family.name!r} model ({type(refiner).__name__}), not a refiner of "
                            f"{served.pipeline_class} ({wanted!r})")
    for name in ("text_encoder_2", "vae"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(refiner, name).state_dict()
        if {k: v.shape for k, v in mine.items()} != {k: v.shape for k, v in theirs.items()}:
            raise SlimDiffError(f"the refiner's {name} is shaped unlike the base's; the repository serves the base's "
                                "to both (as diffusers' ensemble of experts shares them)")
        if not all(torch.equal(mine[k], theirs[k]) for k in mine):
            warnings.warn(f"the refiner's {name} weights differ from the base's; the repository serves the base's "
                          "to both (as diffusers' ensemble of experts shares them)", SlimDiffWarning, stacklevel=2)
    if family.serving_pipeline != type(refiner).__name__:
        raise SlimDiffError(f"--refiner is a {type(refiner).__name__}; the repository runs a refiner as "
                            f"{family.serving_pipeline}")
    return family.serving_pipeline


def build_serving_engines(pipe, out: Path, kind: str, *, image_to_image: bool = False, **build) -> dict[str, Path]:
    """Engines of what a repository serves beside the denoiser — each text encoder the family serves (with the
    outputs its pipeline reads), the VAE decoder and, for a pipeline encoding images (inpainting, and
    ``image_to_image`` requests), the VAE encoder — in new folders
    ``out/<name>``; returns ``{name: folder}`` (a ControlNet's engine is built with the denoiser's, by the caller).
    ``build``: :func:`slimdiff.engines.build.build_component_engine`'s shape and precision arguments."""
    from ..export.modules import text_encoder_component, vae_decoder_component, vae_encoder_component
    from ..export.shapes import Range
    from .build import build_component_engine

    served = check_pipeline(pipe, image_to_image=image_to_image)
    family = served.family
    # The shape flags are the denoiser's, whose batch guidance doubles: the text encoders and the VAE take a
    # request's images, from half the denoiser's smallest batch (one prompt where the UNet takes two) to its largest
    per_image = [dataclasses.replace(p, batch=Range(-(-p.batch.min // 2), p.batch.opt, p.batch.max))
                 for p in build["profiles"]]
    components = []
    for tower in family.served_text_encoders(pipe):
        profiles = per_image
        if tower.tokens is not None:  # the one prompt length the pipeline pads this encoder's prompts to
            fixed = Range(tower.tokens, tower.tokens, tower.tokens)
            profiles = [dataclasses.replace(p, text_len=fixed) for p in profiles]
        components.append((text_encoder_component(getattr(pipe, tower.name), tower.name, tower.outputs,
                                                  attention_mask=tower.attention_mask), profiles, build["dtype"]))
    vae_dtype = vae_engine_dtype(family, pipe.vae, build["dtype"])
    components.append((vae_decoder_component(pipe.vae), per_image, vae_dtype))
    if served.vae_encoder:
        components.append((vae_encoder_component(pipe.vae, pipe.vae_scale_factor), per_image, vae_dtype))
    folders = {}
    for component, profiles, dtype in components:
        folders[component.name] = Path(out) / component.name
        folders[component.name].mkdir()
        build_component_engine(component, kind, folders[component.name],
                               **{**build, "profiles": profiles, "dtype": dtype})
    return folders


def vae_engine_dtype(family, vae, dtype):
    """The precision of a VAE's engines beside engines in ``dtype``: float32 where the family's pipelines upcast the
    VAE (:attr:`~slimdiff.families.DenoiserFamily.upcasts_vae`, for a VAE whose config sets ``force_upcast``: SDXL's,
    whose float16 activations overflow to NaN; its fp16-fix VAE clears the flag and stays in float16)."""
    import torch

    upcast = family.upcasts_vae and vae.config.get("force_upcast", False)
    return torch.float32 if dtype == torch.float16 and upcast else dtype


def write_repository(repo: Path, pipe, denoiser_folder: Path, component_folders: dict[str, Path], mode: str, *,
                     dynamic_batching: bool = True, pipeline_instances: int = 2, image_to_image: bool = False,
                     refiner=None, refiner_folder: Path | None = None) -> None:
    """Fill the (new, empty) folder ``repo`` with the engine models and the pipeline model.
    ``component_folders`` maps each text encoder and ``vae_decoder`` (and ``vae_encoder`` or ``controlnet`` when
    the pipeline has them) to its engine folder (:func:`build_serving_engines`); ``denoiser_folder`` holds the
    denoiser's (the slim UNet's). ``image_to_image``: the pipeline model also takes requests carrying an image
    (``--triton-img2img``). ``refiner``: a refiner pipeline run after ``pipe`` on its latents, its UNet's engine in
    ``refiner_folder`` (served as :data:`REFINER`)."""
    from ..export.modules import CONTROLNET, VAE_ENCODER

    served = check_pipeline(pipe, image_to_image=image_to_image, refiner=refiner)
    family = served.family
    wanted = {t.name for t in family.served_text_encoders(pipe)} | {"vae_decoder"} | (
        {VAE_ENCODER} if served.vae_encoder else set()) | ({CONTROLNET} if served.controlnet else set())
    if set(component_folders) != wanted:
        raise SlimDiffError(f"a {type(pipe).__name__} repository serves {', '.join(sorted(wanted))}; engines were "
                            f"given for {', '.join(sorted(component_folders))}")
    metas = {family.component: add_engine_model(repo, family.component, denoiser_folder, family.component, mode,
                                                dynamic_batching=dynamic_batching)}
    for component, folder in component_folders.items():
        metas[component] = add_engine_model(repo, component, folder, component, mode,
                                            dynamic_batching=dynamic_batching)
    if refiner is not None:
        component = served.family.component  # the refiner's denoiser is a UNet, as the base's
        metas[REFINER] = add_engine_model(repo, REFINER, refiner_folder, component, mode,
                                          dynamic_batching=dynamic_batching)
    add_pipeline_model(repo, pipe, metas, instances=pipeline_instances, image_to_image=image_to_image,
                       refiner=refiner)
    status(f"Triton repository: {', '.join(sorted(p.name for p in Path(repo).iterdir()))} ({mode} engines)")


# ----------------------------------------------------------------------------------------------------------
# A local tritonserver (the one bundled in nvidia-pytriton: python backend only, runs on a CPU)
# ----------------------------------------------------------------------------------------------------------


def _bundled_server() -> tuple[Path, Path, Path]:
    """``(tritonserver binary, its python backend folder, its shared libraries)`` from nvidia-pytriton."""
    try:
        import pytriton
    except ImportError:
        raise SlimDiffError("a local tritonserver needs the nvidia-pytriton wheel (pip install nvidia-pytriton)") \
            from None
    root = Path(pytriton.__file__).parent
    server = root / "tritonserver" / "bin" / "tritonserver"
    stub = root / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    libs = root.parent / "nvidia_pytriton.libs"
    if not server.is_file() or not stub.is_file():
        raise SlimDiffError(f"nvidia-pytriton in {root} has no tritonserver / python backend stub for this Python")
    return server, stub, libs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(repo: Path, *, timeout_s: float = 120.0, log: Path | None = None):
    """Serve ``repo`` with the bundled ``tritonserver`` on 127.0.0.1 (free ports); yields ``{"http": url,
    "grpc": url}`` once every model is ready, and always stops the server (and its stubs) on exit.

    The python backend's stub links the system libpython, so ``LD_LIBRARY_PATH`` holds this Python's
    ``LIBDIR``; this interpreter's ``bin`` goes first on ``PATH`` so the stub imports this environment's
    packages (slimdiff, torch, diffusers)."""
    import urllib.error
    import urllib.request

    server, stub, libs = _bundled_server()
    work = Path(tempfile.mkdtemp(prefix="slimdiff-triton-"))
    backends = work / "backends"
    shutil.copytree(server.parent.parent / "backends", backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    http, grpc = _free_port(), _free_port()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), sysconfig.get_config_var("LIBDIR"),
                                                          env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    command = [str(server), "--model-repository", str(Path(repo).resolve()), "--backend-directory", str(backends),
               "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1",
               "--grpc-port", str(grpc), "--allow-metrics", "false", "--exit-on-error", "true",
               "--strict-readiness", "true",
               # slimdiff's configurations are complete: no stub process per model to ask the model to complete it
               # (each python-backend stub imports torch), and every model loads at once (SDXL has five)
               "--disable-auto-complete-config", "--model-load-thread-count", "8",
               # the stop below ends the backend stubs with the server, which then waits this long for the models
               # they held to unload: they never will
               "--exit-timeout-secs", "1"]
    log = Path(log) if log else work / "tritonserver.log"
    log_file = open(log, "w")
    proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def tail() -> str:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])

    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise SlimDiffError(f"tritonserver exited with code {proc.returncode}: {tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise SlimDiffError(f"tritonserver was not ready after {timeout_s:.0f} s: {tail()}")
            time.sleep(0.5)
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "log": str(log)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and its backend stubs
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log_file.close()
        shutil.rmtree(work, ignore_errors=True)
