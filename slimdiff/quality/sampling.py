"""Seeded sampling of dense and slim pipelines, and the noise-prediction error along the dense trajectory.

Every image ``i`` is the prompt ``prompts[i]`` sampled from the initial latent drawn by a CPU generator seeded
with ``seeds[i]`` (the convention of :mod:`slimdiff.proxy.evaluate`), so images do not depend on batching or
device and a dense and a slim image of the same index differ only through the denoiser (a UNet, or a PixArt / SD3 /
FLUX transformer: the model family says which pipeline component it is, the layout of the latents the pipeline takes
— FLUX's are packed —, how a call's timestep is read and what the pipeline's call needs).

:class:`NoiseErrorProbe` hooks the dense denoiser while the dense pipeline samples: every dense call is repeated
with each slim denoiser on *exactly the same inputs* (latent, timestep, text states), and the relative error of
the slim noise prediction is recorded per image and per call. The slim model never steers the trajectory, so the
error of step k isolates the slim denoiser from the accumulated drift of its own sampling.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import SlimDiffError
from ..families import family_for, image_generators, starting_latents
from ..families.images import read_image
from ..families.refiner import REFINER_START, handed_latents


def image_size(pipe) -> int:
    """Pixel size the pipeline samples at by default (the family's latent sample size × the VAE factor)."""
    family = family_for(pipe)
    return family.sample_size(family.denoiser(pipe).config)[0] * pipe.vae_scale_factor


def with_denoiser(pipe, denoiser):
    """A pipeline of the same class sharing every component of ``pipe`` except the denoiser, and its registered
    options (``requires_safety_checker``, SDXL's ``force_zeros_for_empty_prompt``, the refiner's
    ``requires_aesthetics_score``: a constructor's defaults would change what the pipeline draws)."""
    kwargs = {**pipe.components, family_for(pipe).component: denoiser}
    parameters = inspect.signature(type(pipe).__init__).parameters
    kwargs.update({k: v for k, v in pipe.config.items() if k in parameters and k not in kwargs})
    out = type(pipe)(**kwargs)
    out.set_progress_bar_config(disable=True)
    return out


def _prediction(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


class NoiseErrorProbe:
    """Records ‖ε_slim − ε_dense‖ / ‖ε_dense‖ per image and denoiser call while attached to the dense denoiser.

    With classifier-free guidance the denoiser batch is ``[unconditional; conditional]``; both rows of an image
    enter its error together (the norm is over everything the denoiser predicts for that image at that step).
    """

    def __init__(self, dense_unet: torch.nn.Module, slims: dict[str, torch.nn.Module]):
        if not slims:
            raise SlimDiffError("no slim model to compare against the dense one")
        if any(unet is dense_unet for unet in slims.values()):  # its hook would call itself forever
            raise SlimDiffError("a slim model is the dense denoiser object itself: pass a copy to compare it")
        self.dense_unet, self.slims = dense_unet, slims
        family = family_for(dense_unet)
        self._timestep, self._kept = family.timestep, family.kept_prediction
        self.batches: dict[str, list[np.ndarray]] = {name: [] for name in slims}
        self.timesteps: list[int] | None = None
        self._images = 0
        self._calls: dict[str, list[np.ndarray]] = {}
        self._steps: list[int] = []

    def _hook(self, _module, args, kwargs, output):
        dense = self._kept(kwargs, _prediction(output).detach())
        t = self._timestep(args, kwargs)
        self._steps.append(int(torch.as_tensor(t).flatten()[0]))
        rows = dense.shape[0]
        if rows % self._images:
            raise SlimDiffError(f"denoiser batch of {rows} rows does not split into {self._images} images")
        # diffusers stacks the CFG branches as [uncond; cond]: row r belongs to image r % images
        dense64 = dense.double().reshape(rows // self._images, self._images, -1)
        den = dense64.pow(2).sum(dim=(0, 2))
        for name, unet in self.slims.items():
            slim = self._kept(kwargs, _prediction(unet(*args, **kwargs))).detach().double()
            num = (slim.reshape_as(dense64) - dense64).pow(2).sum(dim=(0, 2))
            self._calls[name].append((num / den.clamp_min(1e-300)).sqrt().cpu().numpy())

    @contextmanager
    def batch(self, images: int) -> Iterator[None]:
        """Attach the hook for one pipeline call over ``images`` images."""
        self._images, self._steps = images, []
        self._calls = {name: [] for name in self.slims}
        handle = self.dense_unet.register_forward_hook(self._hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
        if self.timesteps is None:
            self.timesteps = self._steps
        elif self._steps != self.timesteps:
            raise SlimDiffError("pipeline calls visited different timesteps: the schedule must be fixed")
        for name, calls in self._calls.items():
            self.batches[name].append(np.stack(calls, axis=1))

    def errors(self) -> dict[str, np.ndarray]:
        """(images, denoiser calls) relative errors for every slim model."""
        if self.timesteps is None:
            raise SlimDiffError("the probe has seen no sampling run")
        return {name: np.concatenate(parts, axis=0) for name, parts in self.batches.items()}


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
             size: int | None = None, batch_size: int = 8, probe: NoiseErrorProbe | None = None,
             desc: str | None = None, images: Sequence[Path] = (), strength: float | None = None,
             base=None, refiner_start: float = REFINER_START) -> np.ndarray:
    """Sample ``prompts[i]`` from seed ``seeds[i]``; returns (N, H, W, 3) float32 images in [0, 1].

    ``images``: for a pipeline that takes an image (inpainting, the SDXL refiner, FLUX Control, FLUX Kontext), the files image
    ``i`` starts from or is conditioned on, ``images[seeds[i] mod count]`` (as calibration takes them), instead of
    the family's synthetic one;
    ``strength``: its pipeline's strength (default: the family's measuring task's, else the pipeline's).
    ``base``: an SDXL base pipeline ``pipe`` (the refiner) runs after, as diffusers' ensemble of expert denoisers: the
    base samples each image from its seeded latent to ``denoising_end=refiner_start``, ``pipe`` refines the base's
    latents from ``denoising_start`` with the same generators.

    With ``probe``, the probe's hook runs on every call of the pipeline's denoiser (which must be the probe's dense
    one).
    """
    if len(prompts) != len(seeds) or not prompts:
        raise SlimDiffError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    family = family_for(pipe)
    family.check_sampling(pipe)
    unet = family.denoiser(pipe)
    if probe is not None and probe.dense_unet is not unet:
        raise SlimDiffError("the noise-error probe must be attached to the pipeline's own (dense) denoiser")
    family.check_image_size(pipe, size, size)  # before any sampling: the pipeline checks less, and only once it samples
    size = size or image_size(pipe)
    latent = size // pipe.vae_scale_factor
    device, dtype = unet.device, unet.dtype
    out = []
    for k in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, unit="batch"):
        chunk_p, chunk_s = list(prompts[k:k + batch_size]), seeds[k:k + batch_size]
        # each image's generator draws its latent, then whatever else the pipeline draws for it
        generators = image_generators(chunk_s)
        starts = [read_image(images[int(s) % len(images)]) for s in chunk_s] if images else None
        if base is not None:
            start = {"image": handed_latents(base, chunk_p, generators, steps, refiner_start, size, size,
                                             {"guidance_scale": guidance}),
                     "denoising_start": refiner_start}
        else:
            start = family.measuring_call(size, size, starts, chunk_s)
        if strength is not None:
            start["strength"] = strength
        if family.measures_from_latents and base is None:
            start.update(starting_latents(start.get("strength", 1.0), lambda: family.seeded_latents(
                unet.config, (latent, latent), generators).to(device=device, dtype=dtype)))
        call = lambda: pipe(prompt=chunk_p, num_inference_steps=steps, guidance_scale=guidance,  # noqa: E731
                            output_type="np", generator=generators, **start).images
        if probe is None:
            drawn = call()
        else:
            with probe.batch(len(chunk_p)):
                drawn = call()
        out.append(np.asarray(drawn, dtype=np.float32))
    return np.concatenate(out, axis=0)
