"""One call from a pipeline to a slim pipeline: SlimSet → calibration → slimming.

    import slimdiff
    pipe = slimdiff.load_pipeline("builtin:tiny")
    report = slimdiff.slim_pipeline(pipe, slimdiff.SlimConfig(budget=0.4))
    slimdiff.save_slim(pipe.unet, report.plan, "out/slim-unet")

Calibration is a callback the user owns: pass ``loop=my_loop`` where ``my_loop(prompts, seeds)`` runs any
sampling with ``pipe.unet`` (other schedulers, img2img, ControlNet…); the hooks collect what it visits.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from .calibrate import BatchLoop, CalibrationConfig, Statistics, calibrate, calibration_call, pipeline_loop
from .distributed import Group
from .errors import SlimDiffError, SlimDiffWarning
from .families import family_for
from .prompts import read_prompts
from .slim import SlimConfig, SlimReport, check_budget, slim_unet
from .slimset import SlimSet, text_embedder, select_slimset


def choose_prompts(pipe, pool: Sequence[str] | None = None, num_prompts: int = 500) -> SlimSet:
    """SlimSet selection from a prompt pool (default: the packaged COCO captions) with the pipeline's CLIP."""
    pool = list(pool) if pool is not None else read_prompts()
    if num_prompts < 1:
        raise SlimDiffError(f"number of calibration prompts must be positive, got {num_prompts}")
    if num_prompts >= len(pool):
        if num_prompts > len(pool):
            warnings.warn(f"the prompt pool has {len(pool)} distinct prompts, fewer than the {num_prompts} asked for "
                          f"(--num-prompts): calibrating on all {len(pool)}", SlimDiffWarning, stacklevel=2)
        return SlimSet(pool, list(range(len(pool))))
    return select_slimset(pool, text_embedder(pipe)(pool), num_prompts)


def collect_statistics(
    pipe,
    prompts: Sequence[str] | None = None,
    num_prompts: int = 500,
    out: str | os.PathLike | None = None,
    calibration: CalibrationConfig = CalibrationConfig(),
    loop: BatchLoop | None = None,
    progress: bool = True,
    on_batch: Callable[[str, int], None] | None = None,
    group: Group = Group(),
    site_shards: int | str = 1,
) -> Statistics | None:
    """SlimSet-select ``num_prompts`` from ``prompts`` and calibrate; resumable when ``out`` is given.
    ``on_batch(stage, batches_done)`` is called after each calibration batch. Under torch.distributed
    (``group``) rank 0 returns the statistics, the other ranks None. ``site_shards``: see
    :func:`slimdiff.calibrate.calibrate`."""
    if loop is None and not isinstance(pipe, torch.nn.Module):
        loop = pipeline_loop(pipe, calibration)  # first: what the sampling needs (an inpainting model's images)
    slimset = choose_prompts(pipe, prompts, num_prompts)
    stats = calibrate(pipe, slimset.prompts, out, calibration, loop, progress, on_batch, group=group,
                      site_shards=site_shards)
    if out is not None and stats is not None:  # provenance of the prompt choice (calibration keeps prompts.txt)
        record, text = Path(out) / "slimset.json", slimset.to_json()
        # statistics read again, maybe by several jobs at once, leave it as it is
        if not record.is_file() or record.read_text(encoding="utf-8") != text:
            record.write_text(text, encoding="utf-8")
    return stats


def slim_pipeline(
    pipe,
    config: SlimConfig = SlimConfig(),
    *,
    stats: Statistics | str | os.PathLike | None = None,
    prompts: Sequence[str] | None = None,
    num_prompts: int = 500,
    calibration: CalibrationConfig = CalibrationConfig(),
    loop: BatchLoop | None = None,
    progress: bool = True,
    on_batch: Callable[[str, int], None] | None = None,
) -> SlimReport:
    """Slim the pipeline's denoiser (``pipe.unet``, ``pipe.transformer``) in place. Uses ``stats`` if given (object
    or directory), else calibrates first — after the checks that need no statistics (:func:`check_budget`)."""
    family = family_for(pipe)
    denoiser = family.denoiser(pipe)
    # a MAC budget is priced before calibrating only where the default sampling loop says the calls' sizes
    check_budget(denoiser, config, family,
                 calibration_call(pipe, calibration) if stats is None and loop is None else None)
    if stats is None:
        stats = collect_statistics(pipe, prompts, num_prompts, None, calibration, loop, progress, on_batch)
    elif not isinstance(stats, Statistics):
        stats = Statistics.load(stats)
    return slim_unet(denoiser, stats, config, progress, family=family)
