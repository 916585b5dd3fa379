"""Shape ranges for engines: parsing the CLI's ``MIN:OPT:MAX`` flags, profiles, and per-tensor shapes.

All spatial numbers here are in *latent* units (image pixels ÷ the VAE's scale factor). A profile is one
box of (batch, latent height, latent width, text length); TensorRT gets one optimization profile per box,
ONNX Runtime and AOTInductor get one dynamic range covering all of them (:func:`union`).

A second image's latent beside the latent (FLUX Kontext's reference image) has axes of its own,
:data:`PAIRED_AXES`: sizes independent of the latent's, within the range the profile gives the latent axis each
pairs with, so they need no flags or profile fields of their own.

A tensor's dims mix fixed sizes, axis names and down-sampled axes (``"height/4"``: a UNet's feature map two levels
down, which ControlNet residuals have); :func:`axis_size` resolves any of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SlimDiffError
from ..families.base import PAIRED_AXES

AXES = ("batch", "height", "width", "text_len")
#: Every axis an exported input may name.
ENGINE_AXES = AXES + tuple(PAIRED_AXES)
#: Latent height/width must be multiples of this (the issue's "multiples of 8 in latent space"); a UNet with
#: more down-sampling levels raises it to ``2 ** levels`` so every skip connection lines up.
LATENT_MULTIPLE = 8


@dataclass(frozen=True)
class Range:
    """An inclusive ``min ≤ opt ≤ max`` range of one axis."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise SlimDiffError(f"shape range {self.min}:{self.opt}:{self.max} must satisfy 1 <= min <= opt <= max")

    @classmethod
    def parse(cls, text: str, what: str) -> Range:
        """``"N"`` (static) or ``"MIN:OPT:MAX"``."""
        parts = text.strip().split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise SlimDiffError(f"{what}: {text!r} is not N or MIN:OPT:MAX (integers)") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise SlimDiffError(f"{what}: {text!r} is not N or MIN:OPT:MAX")
        try:
            return cls(*values)
        except SlimDiffError as exc:
            raise SlimDiffError(f"{what}: {exc}") from None

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class Profile:
    """One shape box, latent units. ``batch`` is the UNet batch: classifier-free guidance doubles it."""

    batch: Range
    height: Range
    width: Range
    text_len: Range

    def axis(self, name: str) -> Range:
        return getattr(self, PAIRED_AXES.get(name, name))

    def to_json(self) -> dict:
        return {a: self.axis(a).to_list() for a in AXES}

    @classmethod
    def from_json(cls, body: dict) -> Profile:
        try:
            return cls(*(Range(*body[a]) for a in AXES))
        except (KeyError, TypeError) as exc:
            raise SlimDiffError(f"corrupt shape profile {body!r}: {exc}") from None

    def describe(self) -> str:
        return (f"batch {self.batch}, latent height {self.height}, latent width {self.width}, "
                f"text length {self.text_len}")


def union(profiles: list[Profile]) -> Profile:
    """The smallest range per axis that covers every profile; ``opt`` comes from the first profile."""
    if not profiles:
        raise SlimDiffError("no shape profile given")
    return Profile(*(
        Range(min(p.axis(a).min for p in profiles), profiles[0].axis(a).opt, max(p.axis(a).max for p in profiles))
        for a in AXES
    ))


def latent_multiple(config) -> int:
    """What latent height/width must be divisible by for a denoiser of ``config`` (at least
    :data:`LATENT_MULTIPLE`): a UNet's down-sampling levels, a DiT's patch size."""
    levels = len(config.get("down_block_types") or [None]) - 1
    return math.lcm(LATENT_MULTIPLE, 2 ** levels, int(config.get("patch_size") or 1))


def default_flags(config, vae_scale: int, *, static: tuple[str, ...] = (), text_len: str = "77:77:154",
                  native: int | None = None, sizes_given: bool = False) -> dict[str, str]:
    """Defaults for the shape flags: half to one-and-a-half times the model's native latent size (its config's
    ``sample_size``, else ``native``: the pipeline's default, FLUX's transformer has none; the native size alone for
    ``static`` height/width), denoiser batch 1–4 (one or two images with guidance), and ``text_len`` (for CLIP, 77
    tokens up to two concatenated windows: long prompts). Without a native size, no height and width defaults:
    ``sizes_given`` says the flags give both (else one line)."""
    multiple = latent_multiple(config)
    native = config.get("sample_size") or native
    if not native:
        if sizes_given:
            return {"batch": "1:2:4", "text_len": text_len}
        raise SlimDiffError("the model has no native image size to default --height and --width to: give both")
    native = int(native)
    lo = max(multiple, native // 2 // multiple * multiple)
    hi = max(native, math.ceil(native * 1.5 / multiple) * multiple)
    side = f"{lo * vae_scale}:{native * vae_scale}:{hi * vae_scale}"
    flags = {"batch": "1:2:4", "height": side, "width": side, "text_len": text_len}
    flags.update({axis: str(native * vae_scale) for axis in ("height", "width") if axis in static})
    return flags


def check_static(profiles: list[Profile], static: tuple[str, ...], what: str) -> None:
    """Refuse profiles that vary an axis ``what`` keeps at one size (one line naming the flag)."""
    for axis in static:
        sizes = {(p.axis(axis).min, p.axis(axis).max) for p in profiles}
        if len(sizes) > 1 or any(lo != hi for lo, hi in sizes):
            flag = f"--{axis.replace('_', '-')}"
            raise SlimDiffError(f"{flag}: a {what} engine serves one {axis.replace('_', ' ')}; give a single size "
                                f"({flag} N), one engine per size")


def parse_profiles(batch: str, height: str, width: str, text_len: str, *, vae_scale: int, multiple: int) -> list[Profile]:
    """Profiles from the CLI flags. Each flag holds one range or several separated by commas; flags with one
    range apply to every profile, the others must all list the same number. Height/width are image pixels."""
    flags = {"batch": batch, "height": height, "width": width, "text_len": text_len}
    lists = {a: [t for t in str(flags[a]).split(",") if t.strip()] for a in AXES}
    counts = {len(v) for v in lists.values() if len(v) != 1}
    if any(not v for v in lists.values()) or len(counts) > 1:
        raise SlimDiffError("shape flags list different numbers of ranges: " +
                            ", ".join(f"--{a.replace('_', '-')} {flags[a]}" for a in AXES))
    n = counts.pop() if counts else 1
    profiles = []
    for i in range(n):
        pick = {a: lists[a][i if len(lists[a]) > 1 else 0] for a in AXES}
        ranges = {"batch": Range.parse(pick["batch"], "--batch"), "text_len": Range.parse(pick["text_len"], "--text-len")}
        for a in ("height", "width"):
            px = Range.parse(pick[a], f"--{a}")
            step = vae_scale * multiple
            bad = [v for v in px.to_list() if v % step]
            if bad:
                raise SlimDiffError(f"--{a} {px}: image sizes must be multiples of {step} pixels "
                                    f"(latent multiples of {multiple}; the VAE scales by {vae_scale})")
            ranges[a] = Range(*(v // vae_scale for v in px.to_list()))
        profiles.append(Profile(**ranges))
    return profiles


def split_axis(dim: str) -> tuple[str, int]:
    """``(axis, factor)`` of a named dim: ``"height/4"`` -> ``("height", 4)``, ``"batch"`` -> ``("batch", 1)`` (the
    families write down-sampled axes with :func:`slimdiff.families.base.downsampled_axis`)."""
    axis, _, factor = dim.partition("/")
    return axis, int(factor or 1)


def axis_size(dim, values: dict[str, int]) -> int:
    """The size of one dim (a fixed size, an axis name or a down-sampled axis) at axis sizes ``values``."""
    if isinstance(dim, int):
        return dim
    axis, factor = split_axis(dim)
    return values[axis] // factor


def tensor_shapes(dims: Sequence, values: dict[str, int]) -> tuple[int, ...]:
    """A concrete shape: ``dims`` mixes fixed sizes and (down-sampled) axis names, ``values`` gives each axis' size."""
    return tuple(axis_size(d, values) for d in dims)


def tensor_profile(dims: list, profile: Profile, clip: dict[str, int] | None = None) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of one tensor under one profile — what a TensorRT optimization profile takes.
    ``clip`` caps axes a component cannot exceed (the text encoder's 77 positions)."""
    clip = clip or {}
    out = []
    for k in range(3):
        values = {a: min(profile.axis(a).to_list()[k], clip.get(a, 1 << 30)) for a in ENGINE_AXES}
        out.append(tensor_shapes(dims, values))
    return tuple(out)
