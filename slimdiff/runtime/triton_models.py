"""The python-backend models of a slimdiff Triton repository (see :mod:`slimdiff.engines.triton`), and the same
pipelines in-process.

* :class:`PipelineModel` is prompt in, image out: diffusers' own pipeline loop — the class ``pipeline.json`` names
  (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``PixArtSigmaPipeline``, ``StableDiffusion3Pipeline``,
  ``FluxPipeline``; SD's and SDXL's inpainting and ControlNet pipelines, ``FluxControlNetPipeline``; the
  image-to-image pipelines):
  tokenizers, scheduler, classifier-free guidance, SDXL's micro-conditioning, PixArt's T5 padding mask, SD3's and
  FLUX's VAE shift, FLUX's packed latents and embedded guidance — whose text encoders, denoiser and VAE are stand-ins
  that call the repository's models through Triton's BLS (business logic scripting); the denoiser's (and a
  ControlNet's) is the engine-backed one :func:`~slimdiff.runtime.use_engine` installs, over a
  :class:`BlsRunner`. Running the unchanged diffusers loop is what makes a served image equal to the in-process one
  for the same seed.

The engine models beside it are :class:`slimdiff.engines.triton_engine_model.EngineModel`'s, which import no
diffusers. ``triton_python_backend_utils`` exists only inside Triton's python backend; it is imported there, lazily.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..engines import Runner, engine_outputs, load_engine_meta, open_engine
from ..engines.triton_engine_model import _pb_utils
# repositories written before the engine model moved to slimdiff.engines name it here in their model.py
from ..engines.triton_engine_model import EngineModel  # noqa: F401
from ..engines.triton import (
    CONTROLNET_OPTIONS,
    IMAGE_INPUTS,
    IMAGE_OPTIONS,
    PIPELINE_SPEC,
    REFINER,
    REFINER_OPTIONS,
    batch_dims,
    check_pipeline,
    image_to_image_pipeline,
    latest_version,
)
from ..export.modules import CONTROLNET, VAE_ENCODER
from ..errors import SlimDiffError
from ..families import (
    LAST_HIDDEN_STATE,
    PENULTIMATE_HIDDEN_STATE,
    POOLER_OUTPUT,
    TEXT_EMBEDS,
)
from ..families.refiner import REFINER_START
from .unet import engine_class

#: The image of a request that names no size or seed.
DEFAULTS = {"negative_prompt": None, "seed": 0, "steps": 25, "guidance_scale": 7.5, "height": None, "width": None}


class BlsRunner:
    """A :class:`~slimdiff.engines.Runner` that calls model ``name`` of the running Triton server."""

    def __init__(self, name: str, meta: dict):
        self.name = name
        self.device = torch.device("cpu")  # BLS tensors travel as host arrays here
        self.dtype = getattr(torch, meta["dtype"])
        self.outputs = [o["name"] for o in engine_outputs(meta)]
        _, shapes = batch_dims(meta)
        # Per-item scalars (the timestep) are declared [1] to Triton: (batch,) goes out as (batch, 1).
        self.inputs = [(i["name"], shapes[i["name"]] == []) for i in meta["inputs"]]

    def run(self, inputs: list[torch.Tensor], out_shape: tuple | None = None) -> torch.Tensor:
        return self.run_outputs(inputs)[0]

    def run_outputs(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        pb = _pb_utils()
        tensors = [pb.Tensor(name, (t.reshape(-1, 1) if scalar else t).cpu().numpy())
                   for (name, scalar), t in zip(self.inputs, inputs)]
        response = pb.InferenceRequest(model_name=self.name, inputs=tensors,
                                       requested_output_names=self.outputs).exec()
        if response.has_error():
            raise SlimDiffError(f"Triton model {self.name!r} failed: {response.error().message()}")
        return [torch.from_numpy(np.array(pb.get_output_tensor_by_name(response, name).as_numpy()))
                for name in self.outputs]


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

    def _input(self, x: torch.Tensor, runner: Runner | None = None) -> torch.Tensor:
        return x.to((runner or self.runner).dtype if x.is_floating_point() else torch.int64)


class ServedTextOutput:
    """A transformers text-encoder output as far as diffusers' pipelines read it, from a served encoder's outputs
    (:class:`~slimdiff.families.ServedTextEncoder`): ``[0]``, ``hidden_states[-2]`` and ``pooler_output``.

    ``[0]`` is what it is for transformers: a projecting encoder's ``text_embeds``, else the last hidden state. An
    encoder served with its penultimate hidden state alone (SDXL's first) answers that tensor there: the SDXL pipeline
    reads that encoder's ``[0]`` only to see it is not pooled (its rank), which the two share."""

    def __init__(self, name: str, tensors: dict[str, torch.Tensor]):
        self.name = name
        self.tensors = tensors

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != 0:
            raise SlimDiffError(f"the served {self.name} answers [0] and hidden_states[-2] only")
        for output in (TEXT_EMBEDS, LAST_HIDDEN_STATE, PENULTIMATE_HIDDEN_STATE):
            if output in self.tensors:
                return self.tensors[output]
        # FLUX's CLIP-L, served with its pooler_output alone: the pipeline reads no [0] of it
        raise SlimDiffError(f"the served {self.name} returns its {', '.join(self.tensors)} only, not [0]")

    @property
    def hidden_states(self) -> _PenultimateHiddenState:
        if PENULTIMATE_HIDDEN_STATE not in self.tensors:
            raise SlimDiffError(f"the served {self.name} returns its {', '.join(self.tensors)} only, no hidden states "
                                "(no clip_skip)")
        return _PenultimateHiddenState(self.name, self.tensors[PENULTIMATE_HIDDEN_STATE])

    @property
    def pooler_output(self) -> torch.Tensor:
        if POOLER_OUTPUT not in self.tensors:
            raise SlimDiffError(f"the served {self.name} returns its {', '.join(self.tensors)} only, no pooler_output")
        return self.tensors[POOLER_OUTPUT]


class _PenultimateHiddenState:
    """``hidden_states`` of a served encoder: index -2 only."""

    def __init__(self, name: str, tensor: torch.Tensor):
        self.name, self.tensor = name, tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != -2:  # -(clip_skip + 2) with a clip_skip
            raise SlimDiffError(f"the served {self.name} returns hidden_states[-2] only (no clip_skip)")
        return self.tensor


class TextEncoderStandIn(_Component):
    """A text encoder served as model ``name`` returning ``outputs`` (:class:`ServedTextOutput`), taking the
    tokenizer's attention mask beside the token ids when served ``with_mask`` (PixArt's T5)."""

    def __init__(self, config, runner: Runner, name: str, outputs: list[str], with_mask: bool = False):
        super().__init__(config, runner)
        self.name = name
        self.outputs = list(outputs)
        self.with_mask = with_mask

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, **kwargs):
        if output_hidden_states and PENULTIMATE_HIDDEN_STATE not in self.outputs:
            raise SlimDiffError(f"the served {self.name} returns its {', '.join(self.outputs)} only (no clip_skip)")
        inputs = [self._input(input_ids)]
        if self.with_mask:  # a pipeline that passes none attends to every token
            inputs.append(self._input(torch.ones_like(input_ids) if attention_mask is None else attention_mask))
        elif attention_mask is not None:
            raise SlimDiffError(f"the served {self.name} takes input_ids only, not an attention mask")
        tensors = self.runner.run_outputs(inputs) if len(self.outputs) > 1 else [self.runner.run(inputs, None)]
        return ServedTextOutput(self.name, {name: t.float() for name, t in zip(self.outputs, tensors)})


class VaeStandIn(_Component):
    """The VAE: its decoder served (``runner``) and, for pipelines that encode images (inpainting), its encoder
    (``encoder``: an engine of :func:`~slimdiff.export.modules.vae_encoder_component`, given the image folded onto
    the latent grid)."""

    def __init__(self, config, runner: Runner, encoder: Runner | None = None):
        super().__init__(config, runner)
        self.encoder = encoder
        self.scale = 2 ** (len(config["block_out_channels"]) - 1)

    def decode(self, z, return_dict: bool = True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        image = self.runner.run([self._input(z)], None).float()
        return DecoderOutput(sample=image) if return_dict else (image,)

    def encode(self, x, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.encoder is None:
            raise SlimDiffError("this repository serves no VAE encoder: its pipeline takes no image")
        folded = torch.nn.functional.pixel_unshuffle(x, self.scale)
        posterior = DiagonalGaussianDistribution(self.encoder.run([self._input(folded, self.encoder)], None).float())
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)


def repository_pipeline(version: Path, runner_for: Callable[[str, dict], Runner]):
    """The diffusers pipeline of a repository's ``pipeline/1`` folder (the class its ``pipeline.json`` names), its
    models run by ``runner_for(model name, engine metadata)`` (BLS inside Triton; local engines in-process)."""
    import diffusers
    import transformers
    from diffusers.configuration_utils import FrozenDict

    version = Path(version)
    spec_file = version / PIPELINE_SPEC
    if not spec_file.is_file():
        raise SlimDiffError(f"{str(version)!r} has no {PIPELINE_SPEC}: write the repository again with this slimdiff")
    spec = json.loads(spec_file.read_text(encoding="utf-8"))

    def meta(name: str) -> dict:
        return json.loads((version / f"{name}.engine.json").read_text(encoding="utf-8"))

    def tokenizer(folder: str):
        config = json.loads((version / folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        return getattr(transformers, config["tokenizer_class"]).from_pretrained(version / folder)

    scheduler_class = json.loads((version / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    models = {}
    for tower in spec["text_encoders"]:
        models[tower["name"]] = TextEncoderStandIn(transformers.AutoConfig.from_pretrained(version / tower["name"]),
                                                   runner_for(tower["name"], meta(tower["name"])), tower["name"],
                                                   tower["outputs"], tower.get("attention_mask", False))
        models[tower["tokenizer"]] = tokenizer(tower["tokenizer"])
    served_engines = [spec["denoiser"], *([CONTROLNET] if spec.get("controlnet") else [])]
    for name in served_engines:  # engine-backed denoisers: the UNet, and a ControlNet pipeline's ControlNet
        models[name] = engine_class(meta(name))(runner_for(name, meta(name)), meta(name), version)
    encoder = runner_for(VAE_ENCODER, meta(VAE_ENCODER)) if spec.get("vae_encoder") else None
    models["vae"] = VaeStandIn(FrozenDict(diffusers.AutoencoderKL.load_config(version / "vae")),
                               runner_for("vae_decoder", meta("vae_decoder")), encoder)
    models["scheduler"] = getattr(diffusers, scheduler_class).from_pretrained(version / "scheduler")
    pipe = getattr(diffusers, spec["pipeline_class"])(**models, **spec["options"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def repository_refiner(version: Path, runner_for: Callable[[str, dict], Runner], base):
    """The refiner pipeline a repository written with ``--refiner`` runs after ``base`` (its
    :func:`repository_pipeline`) on the base's latents: the refiner's UNet engine (:data:`REFINER`) and scheduler,
    the base's second text tower and VAE stand-ins; None for a repository serving no refiner."""
    import diffusers

    version = Path(version)
    spec = json.loads((version / PIPELINE_SPEC).read_text(encoding="utf-8")).get("refiner")
    if not spec:
        return None
    meta = json.loads((version / f"{REFINER}.engine.json").read_text(encoding="utf-8"))
    scheduler_config = json.loads((version / spec["scheduler"] / "scheduler_config.json").read_text())
    refiner = getattr(diffusers, spec["pipeline_class"])(
        vae=base.vae, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        unet=engine_class(meta)(runner_for(REFINER, meta), meta, version),
        scheduler=getattr(diffusers, scheduler_config["_class_name"]).from_pretrained(version / spec["scheduler"]),
        **spec["options"])
    refiner.set_progress_bar_config(disable=True)
    return refiner


def local_runners(repo: Path) -> Callable[[str, dict], Runner]:
    """Runners over a ``python``-mode repository's engine folders, in this process: each model's newest version, as
    Triton serves it."""
    def runner_for(name: str, meta: dict) -> Runner:
        return open_engine(*load_engine_meta(latest_version(Path(repo) / name), meta["component"]))

    return runner_for


def generate(pipe, prompt: str, refiner=None, **options) -> np.ndarray:
    """One image, HxWx3 uint8, for ``prompt`` with :data:`DEFAULTS` overridden by ``options`` (and the options the
    pipeline's family always passes: PixArt's exact sizes). An inpainting pipeline takes ``image`` (HxWx3 uint8) and
    ``mask_image`` (HxW uint8, 255 where it paints), and ``strength``; an image-to-image pipeline ``image`` and
    ``strength`` (it draws at the image's size); a ControlNet pipeline ``control_image`` (HxWx3 uint8) and
    ``controlnet_conditioning_scale``. With a ``refiner`` (:func:`repository_refiner`), the pipeline runs the
    schedule up to ``refiner_start`` (default :data:`~slimdiff.families.refiner.REFINER_START`) and the refiner the rest, on its
    latents, with the same prompts, guidance and generator."""
    from PIL import Image

    o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    served = check_pipeline(pipe)
    start = o.pop("refiner_start", None)
    if refiner is None and start is not None:
        raise SlimDiffError(f"a {type(pipe).__name__} request takes no refiner_start: the repository serves no "
                            "refiner")
    start = REFINER_START if start is None else float(start)
    if refiner is not None and not 0 < start < 1:
        raise SlimDiffError(f"refiner_start {start} is outside (0, 1): it is the fraction of the schedule the base "
                            "model runs before the refiner")
    images = {name: o.pop(name) for name in IMAGE_INPUTS if name in o}
    if set(images) != set(served.image_inputs):
        wanted = " and ".join(served.image_inputs) or "no image"
        raise SlimDiffError(f"a {type(pipe).__name__} request takes {wanted}, got {' and '.join(images) or 'none'}")
    arrays = {name: np.asarray(array) for name, array in images.items()}
    # the image's size (or the only image's); a mask must have it, the pipeline resizes a conditioning image
    size = arrays["image"].shape[:2] if "image" in arrays else next(iter(arrays.values())).shape[:2] if arrays else None
    for name, array in arrays.items():
        wanted, sized = tuple(IMAGE_INPUTS[name]), name != "control_image"
        if array.dtype != np.uint8 or array.shape[2:] != wanted[2:] or (sized and array.shape[:2] != size):
            raise SlimDiffError(f"{name} must be a uint8 array of {'HxWx3' if len(wanted) == 3 else 'HxW'} pixels"
                                f"{' the size of the image' if sized else ''}, got {array.dtype} {array.shape}")
    extra = dict(served.family.pipeline_options)
    for name, array in arrays.items():
        extra[served.call_argument(name)] = Image.fromarray(array)  # RGB for HxWx3, L (grey) for HxW
    for name in {**IMAGE_OPTIONS, **CONTROLNET_OPTIONS}:
        if name in o:
            if name not in served.options:
                raise SlimDiffError(f"a {type(pipe).__name__} request takes no {name}")
            extra[name] = float(o.pop(name))
    if "height" in inspect.signature(pipe.__call__).parameters:
        # a request carrying images draws at their size unless it names one (the pipelines' default would be the
        # model's native size, resizing the images), rounded down to the VAE's scale as diffusers' image processor does
        default = (None, None) if size is None else tuple(x - x % pipe.vae_scale_factor for x in size)
        extra.update(height=o["height"] or default[0], width=o["width"] or default[1])
        if extra["height"] and extra["width"]:
            extra.update(served.family.sized_options(extra["height"], extra["width"]))
    elif (o["height"], o["width"]) not in ((None, None), size):  # SD's and SDXL's image-to-image: the image's size
        raise SlimDiffError(f"a {type(pipe).__name__} request draws at its image's size ({size[0]}x{size[1]}): leave "
                            f"out height and width, or send an image of {o['height']}x{o['width']}")
    # no negative prompt: the pipeline's own default (None for SD and SDXL, "" for PixArt, which refuses None)
    negative = {} if o["negative_prompt"] is None else {"negative_prompt": o["negative_prompt"]}
    call = dict(**negative, num_inference_steps=int(o["steps"]), guidance_scale=float(o["guidance_scale"]),
                generator=torch.Generator().manual_seed(int(o["seed"])))
    if refiner is None:
        image = pipe(prompt=prompt, **call, output_type="np", **extra).images[0]
    else:  # diffusers' ensemble of expert denoisers: the base's high-noise steps, then the refiner's
        latents = pipe(prompt=prompt, **call, denoising_end=start, output_type="latent", **extra).images
        image = refiner(prompt, **call, image=latents, denoising_start=start, output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil


class PipelineModel:
    """Triton python-backend model: prompt in, image out."""

    def initialize(self, args):
        version = Path(args["model_repository"]) / args["model_version"]
        self.pipe = repository_pipeline(version, BlsRunner)
        # a repository written with --triton-img2img: requests carrying an image run the image-to-image pipeline
        spec = json.loads((version / PIPELINE_SPEC).read_text(encoding="utf-8"))
        self.image_to_image = image_to_image_pipeline(self.pipe) if spec.get("image_to_image") else None
        self.refiner = repository_refiner(version, BlsRunner, self.pipe)  # --refiner: run after the pipeline

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

                images = {}
                for name in IMAGE_INPUTS:
                    tensor = pb.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        images[name] = tensor.as_numpy()
                # those absent are None: left out
                options = (*DEFAULTS, *IMAGE_OPTIONS, *CONTROLNET_OPTIONS, *REFINER_OPTIONS)
                pipe = self.image_to_image if self.image_to_image and "image" in images else self.pipe
                image = generate(pipe, value("prompt"), refiner=self.refiner,
                                 **{k: value(k) for k in options}, **images)
                responses.append(pb.InferenceResponse([pb.Tensor("image", image)]))
            except Exception as exc:
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses
