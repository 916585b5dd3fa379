"""LoRAs fused into a pipeline before slimming: "fuse, then slim".

A LoRA made for the dense model adds ``B·A`` to the weights of the Linears slimming resizes (``to_q``, ``to_k``,
``to_v``, ``to_out.0``, the FFN projections): after slimming those Linears have other shapes, so the LoRA no
longer fits them. It is fused into the dense weights first, and the slim model is made from the fused model —
calibrated with the LoRA (exact), or from the base model's statistics when the LoRA only nudges the weights
(cheap: one calibration serves many LoRAs; ``slimdiff slim --stats`` decides by fingerprint).

diffusers reads every LoRA layout users bring (kohya / A1111, diffusers, PEFT, the FLUX trainers') and fuses
it; it needs ``peft``. This module adds what a CLI needs around it: files checked before any work, safetensors
only (never a pickle), a LoRA that matches no layer — or only some of its layers — refused in one line instead of
diffusers' warning, and a record (path, scale, sha256) that lets a slim folder reopen the same fused pipeline.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import SlimDiffError
from .hub_cache import missing_message, resolve_file_source


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to fuse: a ``.safetensors`` file and the scale it is fused at (diffusers' ``lora_scale``)."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``FILE`` or ``FILE:SCALE`` (``style.safetensors:0.8``); ``FILE`` may name a LoRA in the Hugging Face
        cache: ``owner/name`` or ``owner/name/FILE`` (:func:`slimdiff.hub_cache.resolve_file_source`)."""
        path, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a colon inside the path
        return cls(resolve_file_source(path, "LoRA"), scale)

    def to_record(self) -> dict:
        """What a slim folder records to fuse the same LoRA again (the file's digest tells a changed file)."""
        # absolute, links kept: a LoRA in the Hugging Face cache is a link to a blob named by its hash, no suffix
        path = Path(os.path.abspath(self.path))
        return {"path": str(path), "scale": self.scale, "sha256": _sha256(path)}


def check_loras(specs: Sequence[LoraSpec]) -> None:
    """Refuse, before any model is loaded, LoRAs that cannot be fused: peft missing, files missing, not safetensors,
    without tensors."""
    import importlib.util

    from safetensors import safe_open

    if specs and importlib.util.find_spec("peft") is None:
        raise SlimDiffError("fusing a LoRA needs peft, which diffusers loads LoRAs with: pip install 'slimdiff[lora]' "
                            "(or pip install peft)")
    for spec in specs:
        path = Path(spec.path)
        if not math.isfinite(spec.scale):
            raise SlimDiffError(f"LoRA scale of {spec.path!r} must be a finite number, got {spec.scale}")
        if not path.is_file():
            raise SlimDiffError(missing_message(spec.path, "LoRA file"))
        if path.suffix != ".safetensors":
            raise SlimDiffError(f"LoRA {spec.path!r} is not a .safetensors file (pickled LoRAs are not read: "
                                "convert it to safetensors)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                empty = not list(handle.keys())
        except Exception as exc:
            raise SlimDiffError(f"LoRA {spec.path!r} is not a readable safetensors file: {_one_line(exc)}") from exc
        if empty:
            raise SlimDiffError(f"LoRA {spec.path!r} holds no tensors")


def fuse_loras(pipe, specs: Sequence[LoraSpec]) -> set[str]:
    """Fuse each LoRA into ``pipe``'s weights (denoiser and, where the LoRA has them, text encoders), in order, at
    its scale; the pipeline is left without LoRA layers, as if its weights had been trained so. A slim denoiser
    slimmed with ``--lora-maps`` takes the LoRA mapped onto it (:func:`load_lora`). Returns the components the
    LoRAs went into.

    Refused in one line: a pipeline class diffusers loads no LoRA into, a LoRA none of whose layers exist in
    the pipeline or whose shapes differ (made for another model), or one with layers the pipeline lacks.
    """
    if not specs:
        return set()
    check_loras(specs)
    if not hasattr(pipe, "load_lora_weights"):
        raise SlimDiffError(f"diffusers loads no LoRA into a {type(pipe).__name__}")
    from safetensors.torch import load_file

    touched: set[str] = set()
    for index, spec in enumerate(specs):
        name = f"slimdiff_lora_{index}"
        state = load_file(spec.path)  # read here, so diffusers never falls back to a pickle loader
        try:
            with _diffusers_warnings() as warnings:
                load_lora(pipe, state, adapter_name=name)
        except SlimDiffError:
            _unload(pipe)
            raise
        except Exception as exc:  # diffusers and peft raise many types; the user needs one line
            _unload(pipe)
            raise SlimDiffError(f"LoRA {spec.path!r} does not fit this {type(pipe).__name__} (is it made for "
                                f"another model?): {_one_line(exc)}") from exc
        unmatched = [w for w in warnings if "unexpected keys" in w]
        if unmatched or not any(name in names for names in pipe.get_list_adapters().values()):
            _unload(pipe)
            detail = f": {_one_line(unmatched[0])}" if unmatched else ""
            raise SlimDiffError(f"LoRA {spec.path!r} has layers this {type(pipe).__name__} lacks (is it made for "
                                f"another model?){detail}")
        touched |= {component for component, names in pipe.get_list_adapters().items() if name in names}
        pipe.fuse_lora(lora_scale=spec.scale, adapter_names=[name])
        _unload(pipe)
    return touched


def fuse_loras_onto_statistics(pipe, specs: Sequence[LoraSpec], stats):
    """Fuse ``specs`` into ``pipe`` and return ``(statistics to slim its denoiser with, whether they are the
    model's without the LoRAs)``.

    ``stats`` (:class:`slimdiff.calibrate.Statistics`) are taken as they are when they are the fused model's (the
    fingerprint hashes the weights slimming reads: calibrated with these LoRAs, or LoRAs that leave those weights
    alone). Statistics of the model without the LoRAs are accepted for the fused one, so one calibration serves many
    LoRAs: the factors are then fitted to the activations of the model without them, which costs little for a LoRA
    that nudges the weights and more for one that changes the images (bench/lora_statistics.py); calibrating with
    the LoRAs fused is the exact way. Statistics of neither are refused in one line."""
    from .families import family_for, site_weights_fingerprint

    denoiser = family_for(pipe).denoiser(pipe)
    base = site_weights_fingerprint(denoiser)
    fuse_loras(pipe, specs)
    fused = site_weights_fingerprint(denoiser)
    if stats.fingerprint == fused:
        return stats, False
    if stats.fingerprint == base:
        return stats.adopted_by(fused), True
    raise SlimDiffError("these statistics were collected from a different model (fingerprint mismatch): neither "
                        "from this model nor from it with the LoRAs fused; calibrate it (with or without --lora)")


def load_lora(pipe, source, adapter_name: str | None = None, **kwargs) -> None:
    """Load a LoRA made for the dense model into ``pipe`` — as diffusers' ``pipe.load_lora_weights(source,
    adapter_name=...)`` does, and with its switching after (``set_adapters``, ``fuse_lora``, ``unload_lora_weights``) —
    whose denoiser may be slim: a slim model slimmed with ``--lora-maps`` maps the LoRA onto its resized Linears
    (:mod:`slimdiff.lora_maps`). ``source``: a ``.safetensors`` file (never a pickle) or its tensors.

    For most pipelines ``pipe.load_lora_weights`` alone does the same (the slim model maps what it is given). FLUX's
    pipeline first grows Linears to a LoRA's shapes (its Control-LoRA path), which would widen a slim model's
    resized Linears: here the LoRA is mapped before that pipeline sees it."""
    from .families import family_for
    from .slim_models import SlimModelMixin

    if not hasattr(pipe, "load_lora_weights"):
        raise SlimDiffError(f"diffusers loads no LoRA into a {type(pipe).__name__}")
    if not isinstance(source, dict):
        check_loras([LoraSpec(str(source))])
        from safetensors.torch import load_file

        source = load_file(str(source))
    family = family_for(pipe)
    denoiser = family.denoiser(pipe)
    grows_linears = hasattr(type(pipe), "_maybe_expand_transformer_param_shape_or_error_")
    if isinstance(denoiser, SlimModelMixin) and grows_linears:
        if denoiser.slim_lora_maps is None:
            denoiser.load_lora_adapter(source)  # refused in one line
        from diffusers.utils import convert_unet_state_dict_to_peft

        normalised, alphas = pipe.lora_state_dict(source, return_alphas=True)[:2]
        if alphas:
            raise SlimDiffError(f"this LoRA sets network alphas, which slimdiff does not map onto a slim "
                                f"{type(denoiser).__name__}: fuse it before slimming (slimdiff slim --lora)")
        prefix = f"{family.component}."
        own = {k.removeprefix(prefix): v for k, v in normalised.items() if k.startswith(prefix)}
        if own and not any("lora_A" in k for k in own):
            own = convert_unet_state_dict_to_peft(own)
        source = {**{k: v for k, v in normalised.items() if not k.startswith(prefix)},
                  **{prefix + k: v for k, v in denoiser.map_dense_lora(own).items()}}
    pipe.load_lora_weights(source, adapter_name=adapter_name, **kwargs)


def records_to_specs(records: Iterable[dict], where: str) -> list[LoraSpec]:
    """The LoRAs a slim folder recorded, checked to be the same files (by sha256) before they are fused again."""
    specs = []
    for record in records:
        path = Path(record["path"])
        if not path.is_file():
            raise SlimDiffError(f"{where} was made with LoRA {str(path)!r} fused in, and that file is gone: put it "
                                "back to reopen the pipeline")
        if _sha256(path) != record["sha256"]:
            raise SlimDiffError(f"{where} was made with LoRA {str(path)!r} fused in, and that file has changed "
                                "since: restore it, or slim again with the new one")
        specs.append(LoraSpec(str(path), float(record["scale"])))
    return specs


def _unload(pipe) -> None:
    with _diffusers_warnings():
        pipe.unload_lora_weights()


@contextmanager
def _diffusers_warnings() -> Iterator[list[str]]:
    """diffusers' log lines while LoRAs load, kept from the console (its "no LoRA keys for the text encoder" is
    routine for a denoiser-only LoRA) and returned: an "unexpected keys" line means layers went unused. transformers'
    weight-loading bars (a text encoder's LoRA) are kept from it too."""
    from transformers.utils import logging as transformers_logging

    logger = logging.getLogger("diffusers")
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    saved = logger.handlers[:], logger.level, logger.propagate
    bars = transformers_logging.is_progress_bar_enabled()
    logger.handlers, logger.propagate = [Keep(logging.WARNING)], False
    logger.setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()
    try:
        yield messages
    finally:
        logger.handlers, logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])
        if bars:
            transformers_logging.enable_progress_bar()


def _one_line(exc: object) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
