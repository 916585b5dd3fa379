"""Shared helpers for the export / engine / runtime tests: structurally real slim UNets without calibration,
the tiny model's shape profiles, and ONNX exports and one ``slimdiff-export`` run cached for the whole test
session (an export costs ~20 s, the command ~2 min)."""

from __future__ import annotations

import contextlib
import io
import os

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from filelock import FileLock

from slimdiff.configs import TINY_UNET, TINY_XL_REFINER_UNET, TINY_XL_UNET
from slimdiff.export.modules import denoiser_component
from slimdiff.export.onnx import export_onnx, load_sidecar, sidecar_path
from slimdiff.export.shapes import parse_profiles
from slimdiff.models import load_unet, module_sites
from slimdiff.plan import RankPlan
from slimdiff.rebuild import apply_plan_shapes

# builtin:tiny: VAE scale 2, latent 16x16 -> images 16..48 px = latent 8..24, two shapes per axis at least.
TINY_FLAGS = {"batch": "1:2:4", "height": "16:32:48", "width": "16:32:48", "text_len": "77:77:154"}


def tiny_profiles(**overrides):
    return parse_profiles(**{**TINY_FLAGS, **overrides}, vae_scale=2, multiple=8)


def default_ranks(sites) -> dict[str, int]:
    """q·k at half width, v at three quarters (multiples of 8, at least 8): q·k and v widths differ."""
    ranks = {}
    for s in sites:
        frac = 0.75 if s.kind == "vo" else 0.5
        ranks[s.name] = max(8, int(s.width * frac) // 8 * 8)
    return ranks


# builtin:tiny and builtin:tiny-xl at two levels instead of three, for the tests of one export or compile path: the
# time torch.export, the ONNX exporter and Inductor take grows with the graph, not with the widths. Each keeps its
# family's call (tiny-xl: text_embeds and time_ids), attention heads of two widths (16 and 32 in tiny, 16 in
# tiny-xl), a downsampling and an upsampling (non-square latents through both), in 4 transformer blocks instead of
# 7 (tiny) or 11 (tiny-xl).
TWO_LEVEL_UNET = dict(TINY_UNET, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TWO_LEVEL_XL_UNET = dict(TINY_XL_UNET, block_out_channels=(32, 64), attention_head_dim=(2, 4),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1))
TWO_LEVEL_XL_REFINER_UNET = dict(TINY_XL_REFINER_UNET, block_out_channels=(32, 64), attention_head_dim=(2, 4),
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=1)


def seeded_unet(config: dict, seed: int = 0):
    """A UNet2DConditionModel of ``config`` with torch's default initialisation from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config).eval().requires_grad_(False)


def slim_tiny_unet(seed: int = 0, ranks: dict[str, int] | None = None, model: str = "builtin:tiny",
                   config: dict | None = None):
    """``model``'s UNet (or a UNet2DConditionModel of ``config``) resized to a rank plan and re-initialised
    N(0, 0.02): a real slim structure."""
    unet = seeded_unet(config) if config is not None else load_unet(model)
    sites = module_sites(unet)
    plan = RankPlan.from_ranks(sites, ranks if ranks is not None else default_ranks(sites))
    apply_plan_shapes(unet, plan)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return unet.eval(), plan


def write_slim_pipeline(out, model: str = "builtin:tiny", seed: int = 0):
    """``model``'s pipeline around :func:`slim_tiny_unet`'s UNet, written as a slim pipeline folder (what ``slimdiff
    slim --save-pipeline`` writes) at ``out``: a slim model for the export command with no calibration to run. Seeded:
    every call writes the same weights, so the exports of every test that uses one are one export (the cache)."""
    from slimdiff.models import load_pipeline
    from slimdiff.serialization import save_slim_pipeline

    pipe = load_pipeline(model)
    unet, plan = slim_tiny_unet(seed, model=model)
    pipe.unet = unet
    return save_slim_pipeline(pipe, plan, out)


def seeded_controlnet(unet, seed: int = 0) -> ControlNetModel:
    """A ControlNet made from ``unet``'s architecture and weights (diffusers' ``from_unet``, no hub), its
    conditioning embedding down-sampling once (8 -> 16 channels: the tiny VAE's factor 2, where SD's VAE needs 8).
    Its zero convolutions — a fresh ControlNet adds nothing, training grows them — get seeded random weights, so its
    residuals change the image and a runtime that dropped them would be seen."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
        zero_convolutions = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                             controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convolutions:
            torch.nn.init.normal_(conv.weight, std=0.05)
    return controlnet.eval().requires_grad_(False)



_CACHE: dict = {}


def shared_folder(tmp_path_factory):
    """The folder every pytest-xdist worker of this run sees (their base folders' parent)."""
    shared = tmp_path_factory.getbasetemp()
    return shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared


def cached_export(tmp_path_factory, variant: str, opset: int = 23):
    """``(onnx path, sidecar, unet)`` for ``variant`` in {dense, slim}, exported once per test run: pytest-xdist
    workers share their base folder's parent, so the first worker to need a variant exports it (under a file lock)
    and the others read its files. The UNets are seeded, so every worker's copy is the exported one."""
    key = (variant, opset)
    if key not in _CACHE:
        unet = load_unet("builtin:tiny") if variant == "dense" else slim_tiny_unet()[0]
        folder = shared_folder(tmp_path_factory) / f"export-{variant}{opset}"
        path = folder / "unet.onnx"
        with FileLock(str(folder) + ".lock"):
            if sidecar_path(path).is_file():
                sidecar = load_sidecar(path)
            else:
                folder.mkdir(exist_ok=True)
                sidecar = export_onnx(denoiser_component(unet), tiny_profiles(), path, opset=opset)
        _CACHE[key] = (path, sidecar, unet)
    return _CACHE[key]


# Calibration of the command-line export: a few prompts and steps, enough to slim the tiny model.
FAST_CALIBRATION = ["--num-prompts", "4", "--steps", "2", "--pass1-prompts", "2"]


def cached_cli_export(tmp_path_factory):
    """``(root, stdout)`` of one ``slimdiff-export`` run per test run: builtin:tiny to ONNX Runtime, dense and slim
    engines in ``root/engines`` (the dense one built in a second process: ``--jobs 2``), and a python-mode Triton
    repository in ``root/repo``. The command-line tests and
    the Triton tests read the same run (the first worker to need it runs it under a file lock); nobody may change
    its files."""
    if "cli" not in _CACHE:
        from slimdiff.cli import export as cli

        root = shared_folder(tmp_path_factory) / "slimdiff-export-tiny"
        printed = root / "stdout.txt"
        with FileLock(str(root) + ".lock"):
            if not printed.is_file():
                root.mkdir(exist_ok=True)
                stdout, stderr = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                    rc = cli.main(["--model", "builtin:tiny", "--engine", "ort", "--out", str(root / "engines"),
                                   "--triton-repo", str(root / "repo"), "--triton-mode", "python", "--jobs", "2",
                                   *FAST_CALIBRATION])
                assert rc == 0, stderr.getvalue()
                printed.write_text(stdout.getvalue())  # written last: its presence says the run finished
        _CACHE["cli"] = (root, printed.read_text())
    return _CACHE["cli"]
