"""``slimdiff-export``: build deployable engines of a dense model and its slim version, and verify them.

    slimdiff-export --model builtin:tiny --engine ort --out engines/

Given a dense model (built-in, diffusers folder, ``.safetensors``) it builds the dense engine of its denoiser (the
UNet; PixArt's transformer), slims the denoiser (calibration flags as in ``slimdiff slim``; default budget 40 % of
the compressible parameters) and builds the slim engine; ``--slim-only`` skips the dense one. Given a slim folder
(``slimdiff slim`` output) it builds the slim engine only. Each engine is then loaded through :mod:`slimdiff.runtime`,
called as its pipeline calls it and compared with the PyTorch denoiser on random inputs; a table (engine, file,
size, parameters, max abs error, load time) ends the run. The text encoders and the VAE stay in PyTorch
(``export.json`` lists them) unless ``--triton-repo`` serves the pipeline (SD-1.x/2.x, SDXL, PixArt-Σ, SD3, FLUX).

``--controlnet-inputs`` builds UNet engines (SD-1.x/2.x, SDXL) that also take a ControlNet's residuals
(``down_block_additional_residuals``, ``mid_block_additional_residual``), for ControlNet pipelines — FLUX transformer
engines that take a FLUX ControlNet's block samples; ``--controlnet DIR`` builds the ControlNet's engine too
(``OUT/controlnet``), which returns those residuals (samples); with ``--triton-repo``
the repository then serves the family's ControlNet pipeline (prompt and conditioning image in). ``--refiner MODEL``
(SDXL base, with ``--triton-repo``) builds the refiner's UNet engine too and serves the ensemble of expert
denoisers: the base's steps up to a request's ``refiner_start``, the refiner's after.

PixArt engines serve one image size (``--height N --width N``, default the transformer's native size) and PixArt's
token count (300 for Σ, 120 for α: the pipeline pads T5 prompts to it); their T5 padding mask is an input.

Output layout (written to a temporary sibling and renamed into place only when everything succeeded)::

    OUT/export.json                          the command, versions and the table
    OUT/slim-unet/                           the slim denoiser the engine was built from (as `slimdiff slim` writes
                                             it; only when the export slimmed a dense model)
    OUT/{dense,slim}/unet.onnx[.data]        ONNX export (trt / ort) + unet.onnx.json sidecar (transformer.* for
                                             PixArt)
    OUT/{dense,slim}/unet.{plan,ort.onnx,pt2} engine + unet.engine.json metadata
    OUT/{text_encoder,vae_decoder}/          with --triton-repo: their engines, served beside the slim denoiser
    OUT/text_encoder_2/                      (SDXL, SD3, FLUX: the second text encoder too; SD3: text_encoder_3/)
    OUT/controlnet/                          with --controlnet: the ControlNet's engine
    OUT/refiner/                             with --refiner: the SDXL refiner's UNet engine (served after the base)

``--triton-repo DIR`` also writes a Triton Inference Server model repository (see :mod:`slimdiff.engines.triton`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

from ..console import quiet_library_noise, run_command
from ..devices import resolve_device
from ..errors import SlimDiffError
from ..export.meta import EXPORT_FILE, EXPORT_FORMAT, status, write_json_atomic
from ..hub_cache import resolve_model_source
from .arguments import lora_specs, refuse_sampling_flags

DEFAULT_BUDGET = "0.4"  # the paper's ~40 % of the compressible mass
FP32_ENGINE_TOLERANCE = 1e-4  # relative, as for the ONNX parity check


def build_parser() -> argparse.ArgumentParser:
    from .. import engines
    from .arguments import add_calibration_arguments, add_lora_argument, add_version_argument  # as `slimdiff slim`'s

    p = argparse.ArgumentParser(prog="slimdiff-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(p)
    p.add_argument("--model", required=True, type=resolve_model_source,
                   help="dense model (builtin:tiny, builtin:tiny-xl, builtin:tiny-xl-refiner, builtin:sd15-shape, "
                        "builtin:sdxl-shape, a diffusers folder, a .safetensors file), a slim folder written by "
                        "`slimdiff slim`, or a slim pipeline folder (`slimdiff slim --save-pipeline`)")
    p.add_argument("--engine", required=True, choices=engines.names(),
                   help="; ".join(f"{n}: {engines.get(n).description}" for n in engines.names()))
    p.add_argument("--config", default=None, metavar="DIR", type=resolve_model_source,
                   help="for a single-file .safetensors checkpoint: a diffusers folder with its configuration")
    p.add_argument("--variant", default=None, help="weight variant of a pipeline folder, e.g. fp16")
    add_lora_argument(p)
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--slim-only", action="store_true", help="skip the dense engine")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                   help="1: build the engines one after the other (default); 2: build the dense engine in a second "
                        "process while the model is slimmed and its slim engine built — faster with spare cores, "
                        "but a second copy of the dense model is held in memory")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; trt needs cuda)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="fp16", action="store_true", default=None,
                           help="FP16 engine (default on GPU)")
    precision.add_argument("--fp32", dest="fp16", action="store_false", help="FP32 engine (default on CPU)")
    p.add_argument("--controlnet-inputs", action="store_true",
                   help="UNet engines that also take ControlNet residuals (down_block_additional_residuals, "
                        "mid_block_additional_residual), for StableDiffusion(XL)ControlNetPipeline; FLUX transformer "
                        "engines that take the ControlNet's block samples, for FluxControlNetPipeline (as many as its "
                        "ControlNet gives); verified with random residuals / samples")
    p.add_argument("--controlnet", default=None, metavar="DIR", type=resolve_model_source,
                   help="a ControlNet made for the model (a diffusers ControlNetModel folder, or a FluxControlNetModel "
                        "one for FLUX; safetensors) built as an engine too, into OUT/controlnet (ONNX Runtime); "
                        "implies --controlnet-inputs")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset: 23 = native fused Attention/GroupNormalization (default), "
                        "18 = decomposed attention for TensorRT < 10.14 (chosen automatically there)")
    shapes = p.add_argument_group("shapes", "MIN:OPT:MAX or N; several comma-separated ranges give several "
                                            "TensorRT profiles (flags with one range apply to all)")
    shapes.add_argument("--batch", default=None, help="UNet batch; guidance doubles it (default 1:2:4)")
    shapes.add_argument("--height", default=None,
                        help="image height in pixels, latent multiples of 8 (default: half to 1.5x the model's)")
    shapes.add_argument("--width", default=None, help="image width in pixels (default as --height)")
    shapes.add_argument("--text-len", default=None, help="tokens of the text embedding (default 77:77:154)")
    slim = p.add_argument_group("slimming (dense models)")
    slim.add_argument("--budget", default=None,
                      help=f"fraction of the compressible parameters to remove (default {DEFAULT_BUDGET}) or an "
                           "amount (100M)")
    slim.add_argument("--stats", default=None, help="statistics directory from `slimdiff calibrate`")
    add_calibration_arguments(slim)
    triton = p.add_argument_group("Triton Inference Server")
    triton.add_argument("--triton-repo", default=None, metavar="DIR",
                        help="also write a Triton model repository to DIR: the slim denoiser, text encoder(s) and "
                             "VAE decoder engines and a python-backend pipeline model (prompt in, image out); serves "
                             "SD-1.x/2.x, SDXL (base or refiner), PixArt-Σ, SD3 and FLUX pipelines, SD's and SDXL's "
                             "inpainting pipelines, FLUX Fill and FLUX Control, and with --controlnet SD's and SDXL's "
                             "ControlNet (inpainting) pipelines and FLUX's FluxControlNetPipeline")
    triton.add_argument("--triton-img2img", action="store_true",
                        help="the pipeline model also takes image-to-image requests (an image and a strength; SD, "
                             "SDXL, SD3, FLUX; with --controlnet, ControlNet image-to-image): a VAE encoder engine "
                             "is served too")
    triton.add_argument("--refiner", default=None, metavar="MODEL", type=resolve_model_source,
                        help="SDXL base: a refiner the repository runs after the base on its latents (diffusers' "
                             "ensemble of expert denoisers; requests take refiner_start, default 0.8) — a refiner "
                             "pipeline folder or built-in (served dense), or a slim refiner folder from `slimdiff "
                             "slim --images`; its UNet engine is built beside the base's (OUT/refiner), with the "
                             "base's shapes; it shares the base's second text encoder and VAE")
    triton.add_argument("--triton-mode", default="native", choices=["native", "python"],
                        help="native: Triton's tensorrt_plan / onnxruntime backends (default); python: the engines "
                             "run by slimdiff in Triton's python backend (CPU-only servers)")
    trt = p.add_argument_group("TensorRT")
    trt.add_argument("--trt-opt-level", type=int, default=3, help="builder optimization level 0..5 (default 3)")
    trt.add_argument("--timing-cache", default=None,
                     help="timing cache file, reused across builds (default: ~/.cache/slimdiff/tensorrt/)")
    trt.add_argument("--no-cuda-graphs", action="store_true", help="verify without CUDA graphs")
    trt.add_argument("--trt-refittable", action="store_true",
                     help="build refittable engines (BuilderFlag.REFIT): they take new weights later "
                          "(pipe.unet.load_weights_from) without a rebuild")
    return p


def _load_model(source: str, config: str | None = None, variant: str | None = None, loras=(),
                whole_pipeline: bool = False):
    """``(pipeline or None, dense denoiser or None, slim denoiser or None, plan or None)``; ``loras`` are fused into
    a dense model, or mapped onto a slim folder's denoiser and fused (:func:`run` refuses them for a slim folder
    without LoRA maps). A slim folder's pipeline — the model it was slimmed from, around the slim denoiser — is
    loaded when ``whole_pipeline`` (a Triton repository serves it all) or for its LoRAs; a slim pipeline folder is
    its own pipeline."""
    from ..families import family_for
    from ..lora import fuse_loras
    from ..models import load_pipeline
    from ..serialization import is_slim_folder, load_plan, load_slim, slim_denoiser_folder

    if is_slim_folder(source):
        if not loras and not whole_pipeline:
            return None, None, load_slim(source), load_plan(source)
        pipe = load_pipeline(source)
        component = family_for(pipe).component
        elsewhere = sorted(fuse_loras(pipe, loras) - {component})
        if elsewhere:  # the engines of a slim folder are its denoiser's alone
            raise SlimDiffError(f"the LoRA also changes the {', '.join(elsewhere)}, which the engines of a slim "
                                "folder do not hold: export from the dense model with --lora, or use a LoRA of the "
                                f"{component} alone")
        for spec in loras:
            print(f"LoRA {spec.path} (scale {spec.scale:g}) mapped onto the slim {component} and fused")
        return pipe if whole_pipeline else None, None, getattr(pipe, component), load_plan(source)
    try:
        pipe = load_pipeline(source, config=config, variant=variant, loras=loras)
    except SlimDiffError as exc:
        raise SlimDiffError(f"{source!r} is neither a dense model (built-in, diffusers pipeline folder, "
                            f".safetensors) nor a slim folder (with slimdiff_plan.json): {exc}") from None
    if (slim := slim_denoiser_folder(source)) is not None:  # a slim pipeline folder: slim already, nothing to calibrate
        return pipe if whole_pipeline else None, None, getattr(pipe, slim.name), load_plan(slim)
    return pipe, family_for(pipe).denoiser(pipe), None, None


def _load_refiner(source: str):
    """``(refiner pipeline, its slim plan or None)``: a slim refiner folder loads the refiner it was slimmed from with
    the slim UNet in it; any other model loads as it is (served dense)."""
    from ..models import load_pipeline
    from ..serialization import load_plan, slim_denoiser_folder

    try:
        return load_pipeline(source), load_plan(slim) if (slim := slim_denoiser_folder(source)) is not None else None
    except SlimDiffError as exc:
        raise SlimDiffError(f"--refiner: {exc}") from None


def _slimming_inputs(pipe, args):
    """Budget, statistics and prompts of the slimming step, checked before any engine is built:
    ``(SlimConfig, Statistics or None, prompts or None, whether the statistics are of the model without its
    LoRAs)``."""
    from ..calibrate import Statistics
    from ..families import family_for
    from ..lora import fuse_loras_onto_statistics
    from ..prompts import read_prompts
    from ..slim import SlimConfig, check_budget, parse_budget

    config = SlimConfig(budget=parse_budget(args.budget))
    denoiser = family_for(pipe).denoiser(pipe)
    check_budget(denoiser, config)
    stats, base_statistics = Statistics.load(args.stats) if args.stats else None, False
    if stats is not None and args.lora:  # the model came without its LoRAs: fingerprinted before and after fusing
        stats, base_statistics = fuse_loras_onto_statistics(pipe, lora_specs(args), stats)
        if base_statistics:
            status("statistics of the model without the LoRA(s): the factors are fitted to its activations "
                   "(calibrate with --lora for the fused model's own)")
    elif stats is not None:
        stats.check_model(denoiser)
    prompts = None if stats is not None else read_prompts(args.prompts, model=args.model)
    return config, stats, prompts, base_statistics


def _calibration_loop(pipe, args, inputs):
    """The calibration's sampling loop of a dense model slimmed without statistics (None otherwise), made — and so
    checked: an inpainting model's or a refiner's images, a refiner's --base, which loads here — before any engine is
    built, on the export device the pipeline is on."""
    from ..calibrate import pipeline_loop
    from .arguments import calibration_config_from_args

    if inputs is None or inputs[1] is not None:
        return None
    return pipeline_loop(pipe, calibration_config_from_args(args))


def _slim_dense_model(pipe, args, inputs, loop):
    """The one call into the slimming pipeline: slims the pipeline's denoiser in place, returns its rank plan."""
    from ..api import slim_pipeline
    from .arguments import calibration_clock, calibration_config_from_args

    config, stats, prompts, base_statistics = inputs
    clock = calibration_clock("slimdiff-export", pipe, len(prompts), args) if stats is None else None
    report = slim_pipeline(pipe, config, stats=stats, prompts=prompts, num_prompts=args.num_prompts,
                           calibration=calibration_config_from_args(args), loop=loop, on_batch=clock)
    if args.lora:
        report.plan.info["statistics_without_loras"] = base_statistics
    return report.plan


def export_bytes_needed(args, backend, dense, slim, slimming, dtype, others) -> int:
    """A lower bound of what an export writes: each engine's weights in the export ``dtype`` (dense unless
    --slim-only, slim, ``others``: a ControlNet, a refiner) — twice for a backend built from ONNX, whose ONNX file
    stays beside the engine (ONNX Runtime's optimized graph, a TensorRT plan), once for an AOTInductor package —
    and, when it slims, the slim UNet folder in its source's dtype."""
    import torch

    from ..checks import budget_amount
    from ..families import module_sites
    from ..sources import source_unet_dtype

    def params(module) -> int:
        return sum(p.numel() for p in module.parameters())

    width = torch.finfo(dtype).bits // 8 * (2 if backend.from_onnx else 1)
    need = params(dense) * width if dense is not None and not args.slim_only else 0
    if slim is not None:
        slim_params = params(slim)
    else:  # the budget's parameters leave; a folder of the slim UNet is written too
        removed = budget_amount(slimming[0].budget, sum(s.params for s in module_sites(dense)))
        slim_params = params(dense) - int(removed)
        need += slim_params * torch.finfo(source_unet_dtype(args.model, args.variant)).bits // 8
    return need + slim_params * width + sum(params(m) * width for m in others)


def _check_room(folder: Path, args, backend, dense, slim, slimming, dtype, others) -> None:
    """Refuse, before calibration and the first build, an export whose files cannot fit on ``folder``'s file system:
    a full disk would otherwise end it after the calibration and the builds it spent."""
    need = export_bytes_needed(args, backend, dense, slim, slimming, dtype, others)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise SlimDiffError(f"the engines need at least {need / 1e9:.1f} GB on the file system of {str(args.out)!r} "
                            f"(their weights{'' if slim is not None else ' and the slim UNet folder'}), and it "
                            f"has {free / 1e9:.1f} GB free: free some space, or --out on another disk")


def _source(model: str) -> str:
    return model if model.startswith("builtin:") else str(Path(model).resolve())


def _save_slim_unet(unet, plan, folder: Path, args) -> None:
    """The slim UNet as ``slimdiff slim`` saves it (diffusers-loadable, reopening its source pipeline, in the dtype
    the source stores its UNet in): users get the model their engine was built from, and ``slimdiff bench`` can
    time both. Called after the engine build, the last user of the module."""
    from ..serialization import save_slim
    from ..sources import source_unet_dtype

    dtype, param = source_unet_dtype(args.model, args.variant), next(unet.parameters())
    if param.device.type != "cpu":
        unet.to("cpu")
    if param.dtype != dtype:  # a dtype argument alone makes diffusers warn about fp32-pinned modules
        unet.to(dtype)
    plan.info["source_model"] = _source(args.model)
    if args.config is not None:
        plan.info["source_config"] = str(Path(args.config).resolve())
    if args.variant is not None:
        plan.info["source_variant"] = args.variant
    if args.lora:  # fused again, from the same files, when the slim folder reopens its pipeline
        plan.info["source_loras"] = [spec.to_record() for spec in lora_specs(args)]
    save_slim(unet, plan, folder)


def _dense_variant_in_process(args, folder: Path, build: dict, export_options: tuple[str, ...], threads: int) -> dict:
    """The dense variant built in a second process (``--jobs 2``), from the dense model loaded again from its source:
    the first process slims its own copy in place meanwhile."""
    import torch

    from ..export import meta

    meta.STATUS_TAG = "slimdiff-export, dense"
    torch.set_num_threads(threads)
    pipe, dense, _, _ = _load_model(args.model, args.config, args.variant, lora_specs(args))
    return _build_variant(args, "dense", dense, None, folder, family=_family(pipe, dense, None),
                          export_options=export_options, **build)


def _call_and_send(send, fn, fn_args) -> None:
    """The second process's body: ``fn(*fn_args)``'s result or exception, sent back through ``send``."""
    quiet_library_noise()
    try:
        send.send((True, fn(*fn_args)))
    except BaseException as exc:  # noqa: BLE001 — every failure goes back to the first process
        if not isinstance(exc, SlimDiffError):
            traceback.print_exc()  # what the first process cannot re-raise with its traceback
        try:
            send.send((False, exc))
        except Exception:  # an exception that does not pickle: its text
            send.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


class _SecondProcess:
    """One call run in a spawned process — a fresh interpreter, safe with CUDA and with torch's thread pools — whose
    result, or exception, :meth:`result` reads back. A process that dies without answering (killed, out of memory)
    is an error, not a wait; :meth:`close` ends it, also when the caller failed first."""

    def __init__(self, fn, *fn_args):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_call_and_send, args=(send, fn, fn_args), name=fn.__name__)
        self._process.start()
        send.close()  # the child holds the only sending end: its death ends recv() with EOFError

    def result(self):
        try:
            ok, value = self._receive.recv()
        except EOFError:
            self._process.join()
            raise SlimDiffError(f"the second process ({self._process.name}) ended without a result "
                                f"(exit code {self._process.exitcode})") from None
        finally:
            self.close()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._receive.close()


def _export_options(args, family, controlnet, pipe) -> tuple[str, ...]:
    """The denoiser family's optional input groups the engines take (:attr:`DenoiserFamily.export_options`): with
    ``--controlnet-inputs`` (or ``--controlnet``), the family's for the ControlNet the engines serve —
    ``--controlnet``'s (``controlnet``), the pipeline's, or that of the pipeline a slim folder was slimmed in (loaded
    only if the family asks: FLUX's sample inputs follow the ControlNet's layout)."""
    if not (args.controlnet_inputs or args.controlnet):
        return ()

    def served_controlnet():
        if controlnet is not None:
            return controlnet
        if pipe is None:
            return _slimmed_in_controlnet(args.model)
        return getattr(pipe, "controlnet", None)

    return (family.controlnet_export_option(served_controlnet),)


def _slimmed_in_controlnet(model: str):
    """The ControlNet of the pipeline ``model`` (a slim folder) was slimmed in, as far as its configuration goes: a
    folder's ``controlnet/config.json`` read alone (beside a FLUX pipeline's T5 and transformer, tens of GB, loading
    the pipeline would double the memory the export holds); a built-in or anything else loaded."""
    from types import SimpleNamespace

    from ..models import load_pipeline
    from ..serialization import is_slim_folder, load_plan

    source = (load_plan(model).info.get("source_model") or "") if is_slim_folder(model) else ""
    config = Path(source) / "controlnet" / "config.json"
    if source and not source.startswith("builtin:") and config.is_file():
        try:
            return SimpleNamespace(config=json.loads(config.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise SlimDiffError(f"{config}: not valid JSON ({exc})") from exc
    return getattr(load_pipeline(model), "controlnet", None)


def _check_controlnet_folder(folder: str, kind: str) -> None:
    """One line, before any work, for a ``--controlnet`` that is not a ControlNet folder slimdiff loads, or an engine
    kind whose runner cannot return a ControlNet's many outputs."""
    from ..engines import get
    from ..families import controlnet_classes

    path = Path(folder)
    try:
        cls_name = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, json.JSONDecodeError):
        cls_name = None
    known = controlnet_classes()
    if cls_name not in known:
        raise SlimDiffError(f"--controlnet {folder!r} is not a ControlNet folder (a config.json of a "
                            f"{' or '.join(known)}, as diffusers' save_pretrained writes it)")
    if not list(path.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".ckpt", ".pt"}))
        raise SlimDiffError(f"--controlnet {folder!r} holds no .safetensors weights"
                            + (f" (found {found}: pickle files are not loaded)" if found else ""))
    if not get(kind).runs_several_outputs:
        raise SlimDiffError(f"a ControlNet engine returns one residual per skip connection, and slimdiff's {kind} "
                            "runner returns one output: build it with --engine ort")


def _load_controlnet(folder: str, denoiser_config):
    """The ControlNet of ``folder``, refused in one line unless its kind's adapter says it was made for a denoiser
    of ``denoiser_config`` and its engine can be built."""
    from ..families import controlnet_adapter, controlnet_classes

    cls_name = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))["_class_name"]
    try:
        controlnet = controlnet_classes()[cls_name].from_pretrained(folder, use_safetensors=True,
                                                                   local_files_only=True)
    except Exception as exc:  # diffusers raises many types; the user needs one line
        raise SlimDiffError(f"could not load the ControlNet in {folder!r}: {exc}") from exc
    adapter, what = controlnet_adapter(controlnet), f"the ControlNet in {folder!r}"
    adapter.check_made_for(controlnet, denoiser_config, what)
    adapter.check_engine(controlnet, what)
    return controlnet.eval().requires_grad_(False)


def _build_controlnet(args, controlnet, folder: Path, profiles, kind: str, device: str, dtype, opset,
                      multiple: int) -> dict:
    """The ControlNet's engine in ``folder``, verified against PyTorch like the denoiser's: a table row."""
    from ..engines.build import build_controlnet_engine
    from ..export.modules import controlnet_component

    folder.mkdir()
    controlnet = controlnet.to(device).float()
    meta, sidecar = build_controlnet_engine(controlnet, kind, folder, profiles=profiles, dtype=dtype, device=device,
                                            multiple=multiple, opset=opset)
    return _verified_row(args, "ControlNet", "controlnet", controlnet_component(controlnet), folder, meta, sidecar,
                         device, dtype)


def _verified_row(args, what: str, variant: str, component, folder: Path, meta: dict, sidecar: dict | None,
                  device: str, dtype) -> dict:
    """The table row of the engine just built in ``folder``: loaded through the runtime, called as its pipeline
    calls it and compared with ``component``'s PyTorch module; a float32 engine beyond the tolerance is an error."""
    import torch

    status(f"verifying the {what} {meta['engine']} engine against PyTorch")
    check = _verify(folder, component, device, {a: r["opt"] for a, r in meta["axes"].items()},
                    not args.no_cuda_graphs)
    if dtype == torch.float32 and check["max_rel_error"] > FP32_ENGINE_TOLERANCE:
        raise SlimDiffError(f"the {what} {meta['engine']} engine differs from PyTorch by {check['max_rel_error']:.2e} "
                            f"(relative; tolerance {FP32_ENGINE_TOLERANCE:.0e})")
    return {"engine": meta["engine"], "variant": variant, "file": f"{folder.name}/{meta['file']}",
            "size_bytes": meta["size_bytes"], "parameters": meta["parameters"], "dtype": meta["dtype"],
            "opset": sidecar["opset"] if sidecar else None, "fused_ops": sidecar["fused"] if sidecar else None,
            **check}


def _verify(folder: Path, component, device: str, values: dict, cuda_graphs: bool, seed: int = 7) -> dict:
    """Load the engine of ``component`` via the runtime and compare its outputs (every one of them), called as its
    pipeline calls it, with the PyTorch module's on seeded random inputs."""
    import torch

    from ..engines import load_engine_meta
    from ..runtime.unet import engine_class

    meta, _ = load_engine_meta(folder, component.name)
    engine = engine_class(meta).from_folder(folder, device=device, cuda_graphs=cuda_graphs)
    inputs = component.random_inputs(values, torch.float32, seed=seed, device=device)
    with torch.no_grad():
        refs, gots = component.module(*inputs), engine.call_exported(inputs)
    refs, gots = (list(t) if isinstance(t, (list, tuple)) else [t] for t in (refs, gots))
    err = max((g.float() - r.float()).abs().max().item() for g, r in zip(gots, refs))
    scale = max(r.float().abs().max().item() for r in refs)
    return {"max_abs_error": err, "max_rel_error": err / max(scale, 1e-12), "load_seconds": engine.load_seconds,
            "shape": values}


def _family(pipe, denoiser, plan):
    """The family whose call the engines take: the pipeline's, or for a slim folder loaded without one the family its
    plan records (slim folders since FLUX Kontext's: its transformer has FLUX.1-dev's configuration, so only the
    pipeline it was slimmed in says it takes a reference image), else the denoiser's own."""
    from ..families import family_for, family_named

    if pipe is not None:
        return family_for(pipe)
    recorded = plan.info.get("family") if plan is not None else None
    return family_named(recorded) if recorded else family_for(denoiser)


def _build_variant(args, variant: str, denoiser, plan, folder: Path, profiles, kind: str, device: str, dtype, opset,
                   multiple: int, family=None, export_options: tuple[str, ...] = ()) -> dict:
    import torch

    from ..engines.build import build_denoiser_engine
    from ..export.modules import denoiser_component

    folder.mkdir()
    denoiser = denoiser.to(device).eval()
    if next(denoiser.parameters()).dtype != torch.float32:
        denoiser = denoiser.float()  # the PyTorch reference and the export source stay float32; fp16 is cast per export
    options = ({"opt_level": args.trt_opt_level, "timing_cache": Path(args.timing_cache) if args.timing_cache else None,
                "refittable": args.trt_refittable} if kind == "trt" else {})
    meta, sidecar = build_denoiser_engine(denoiser, kind, folder, profiles=profiles, dtype=dtype, device=device,
                                          multiple=multiple, opset=opset, variant=variant, plan=plan, options=options,
                                          export_options=export_options, family=family)
    return _verified_row(args, variant, variant, denoiser_component(denoiser, export_options, family), folder,
                         meta, sidecar, device, dtype)


def _nested_output(out: Path, repo: Path) -> bool:
    """Whether the Triton repository folder lies inside the engines' output folder (it is then written inside it);
    one line for the same folder, or the engines' folder inside the repository's (publishing the one would delete
    the other)."""
    out, repo = out.resolve(), repo.resolve()
    if repo == out or out.is_relative_to(repo):
        raise SlimDiffError(f"--out {str(out)!r} and --triton-repo {str(repo)!r}: give the repository a folder of its "
                            "own (beside the engines, or inside --out)")
    return repo.is_relative_to(out)


def _write_triton_repository(args, pipe, controlnet, refiner, out: Path, repo: Path, *, profiles, kind: str,
                             device: str, dtype, opset, multiple: int) -> None:
    """Engines of the text encoders and the VAE (``OUT/text_encoder``, ``OUT/text_encoder_2`` for SDXL,
    ``OUT/vae_decoder``; ``OUT/vae_encoder`` for inpainting and ``--triton-img2img``), then the repository serving
    them with the slim denoiser's engine — and, with a ``controlnet``, the ControlNet's (``OUT/controlnet``) in a
    ControlNet pipeline, or with a ``refiner``, the refiner's UNet engine (``OUT/refiner``) run after it."""
    from ..engines.triton import build_serving_engines, controlnet_pipeline, write_repository
    from ..export.modules import CONTROLNET

    served = pipe if controlnet is None else controlnet_pipeline(pipe, controlnet)
    folders = build_serving_engines(served, out, kind, image_to_image=args.triton_img2img, profiles=profiles,
                                    dtype=dtype, device=device, multiple=multiple, opset=opset)
    if controlnet is not None:
        folders[CONTROLNET] = out / CONTROLNET
    write_repository(repo, served, out / "slim", folders, args.triton_mode, image_to_image=args.triton_img2img,
                     refiner=refiner, refiner_folder=out / "refiner")


def format_table(rows: list[dict]) -> str:
    head = ("engine", "variant", "file", "size", "parameters", "max abs error", "load time")
    body = [(r["engine"], r["variant"], r["file"], f"{r['size_bytes'] / 2**20:.1f} MiB", f"{r['parameters']:,}",
             f"{r['max_abs_error']:.2e}", f"{r['load_seconds']:.2f} s") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in (head, *body)]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def run(args) -> list[dict]:
    import torch

    from .. import engines
    from ..serialization import atomic_output_dir, commit_output_dir, slim_denoiser_folder
    from ..export.onnx import OPSETS
    from ..export.modules import component_axes, denoiser_component
    from ..export.shapes import Range, check_static, default_flags, latent_multiple, parse_profiles, union
    from ..lora_maps import MAPS_FILE

    start = time.perf_counter()
    backend = engines.get(args.engine)
    device = resolve_device(args.device)
    backend.require(device)  # before any slow work: one line naming the alternatives
    slim_source = slim_denoiser_folder(args.model)
    if args.lora and slim_source is not None and not (slim_source / MAPS_FILE).is_file():
        raise SlimDiffError(f"{args.model!r} is a slim folder made without --lora-maps, whose weights a LoRA of the "
                            "dense model does not fit: leave out --lora, slim with --lora-maps, or fuse the LoRA into "
                            "the dense model before slimming (`slimdiff slim --lora`)")
    opset = args.opset or backend.onnx_opset()
    if opset not in OPSETS:
        raise SlimDiffError(f"--opset {opset} is not supported: use 23 (fused) or 18 (decomposed attention)")
    fp16 = args.fp16 if args.fp16 is not None else device.startswith("cuda")
    dtype = torch.float16 if fp16 else torch.float32
    for option, given in (("--triton-img2img", args.triton_img2img), ("--refiner", args.refiner)):
        if given and not args.triton_repo:
            raise SlimDiffError(f"{option} is an option of the Triton repository: give --triton-repo DIR too")
    if args.triton_repo:
        from ..engines.triton import check_mode

        check_mode(args.engine, args.triton_mode)
        if args.controlnet_inputs and not args.controlnet:
            raise SlimDiffError("--triton-repo serves a ControlNet pipeline with its ControlNet's engine: give "
                                "--controlnet DIR, or leave out --controlnet-inputs")
    if args.controlnet:
        _check_controlnet_folder(args.controlnet, args.engine)
    if slim_source is not None:
        given = [flag for flag, value in (("--budget", args.budget), ("--stats", args.stats)) if value is not None]
        if given:  # they would be ignored: the folder's plan is what is exported
            raise SlimDiffError(f"{args.model!r} is slim already and is exported as it is: leave out "
                                f"{' and '.join(given)} (another budget: slim its dense model with `slimdiff slim`, "
                                "or export the dense model)")
    elif args.budget is None:
        args.budget = DEFAULT_BUDGET
    if args.stats or slim_source is not None:
        refuse_sampling_flags(args, "--stats gives statistics collected already" if args.stats else
                              f"{args.model!r} is slim already")
    out = Path(args.out)
    repo_inside_out = args.triton_repo is not None and _nested_output(out, Path(args.triton_repo))
    tmp = atomic_output_dir(out, overwrite=args.force)
    repo_tmp = None
    if repo_inside_out:  # published with the engines: out's temporary folder holds it
        repo_tmp = tmp / Path(args.triton_repo).resolve().relative_to(out.resolve())
        repo_tmp.mkdir(parents=True)
    elif args.triton_repo:
        repo_tmp = atomic_output_dir(Path(args.triton_repo), overwrite=args.force)
    dense_process = None
    try:
        # with --stats, the LoRAs are fused by _slimming_inputs, which fingerprints the model before and after (a
        # slim folder takes no statistics)
        loras = () if args.stats and slim_source is None else lora_specs(args)
        pipe, dense, slim, plan = _load_model(args.model, args.config, args.variant, loras,
                                              whole_pipeline=args.triton_repo is not None)
        controlnet = _load_controlnet(args.controlnet, (dense or slim).config) if args.controlnet else None
        refiner, refiner_plan = _load_refiner(args.refiner) if args.refiner else (None, None)
        slimming = _slimming_inputs(pipe, args) if slim is None else None
        if repo_tmp is not None:
            from ..engines.triton import check_pipeline, controlnet_pipeline

            serving = check_pipeline(pipe, args.engine, args.triton_mode,
                                     image_to_image=args.triton_img2img and controlnet is None,
                                     refiner=refiner if controlnet is None else None)
            if serving.controlnet and controlnet is None:  # a FluxControlNetPipeline: its transformer takes samples
                raise SlimDiffError(f"--triton-repo serves {serving.pipeline_class} with its ControlNet's engine: give "
                                    "--controlnet DIR (the pipeline's controlnet folder)")
            if controlnet is not None:
                check_pipeline(controlnet_pipeline(pipe, controlnet), args.engine, args.triton_mode,
                               image_to_image=args.triton_img2img, refiner=refiner)
        if pipe is not None:
            pipe.to(device)  # calibration runs the whole pipeline on the export device
        reference = dense if dense is not None else slim
        family = _family(pipe, reference, plan)
        vae_scale = getattr(pipe, "vae_scale_factor", 8) if pipe is not None else 8
        multiple = latent_multiple(reference.config)
        defaults = default_flags(reference.config, vae_scale, static=family.static_axes,
                                 text_len=family.default_text_len(pipe),
                                 native=getattr(pipe, "default_sample_size", None),
                                 sizes_given=bool(args.height and args.width))
        def profiles_on(grid: int):
            """The shape flags' profiles, their latent sizes checked against multiples of ``grid``."""
            return parse_profiles(args.batch or defaults["batch"], args.height or defaults["height"],
                                  args.width or defaults["width"], args.text_len or defaults["text_len"],
                                  vae_scale=vae_scale, multiple=grid)

        profiles = profiles_on(multiple)
        check_static(profiles, family.static_axes, type(reference).__name__)
        refiner_build = None
        if refiner is not None:  # the base's shapes, on the refiner's latent grid (three down-samplings in SDXL's)
            refiner_multiple = latent_multiple(refiner.unet.config)
            refiner_build = {"profiles": profiles_on(refiner_multiple), "multiple": refiner_multiple}
        if repo_tmp is not None:
            # the served pipeline calls the denoiser with the text length it makes (the default's OPT: CLIP's 77, or
            # the T5 length PixArt-Σ and SD3 pad every prompt to): engines without it would refuse every request
            served = Range.parse(family.default_text_len(pipe), "text length").opt
            narrow = [str(p.text_len) for p in profiles if served not in p.text_len]
            if narrow:
                raise SlimDiffError(f"--text-len {narrow[0]} leaves out the {served} text tokens the served "
                                    f"{type(pipe).__name__} passes its {family.component}: include {served}, or "
                                    "leave --text-len out")
            # A request draws one image: its denoiser call has the guided rows per image, or one row at
            # guidance_scale <= 1. Engines taking neither would answer no request; engines taking only one row are
            # a guidance-free model's (SDXL-Turbo is served at guidance_scale 0): a note, not a refusal.
            from ..runtime.triton_models import DEFAULTS as REQUEST_DEFAULTS

            rows_per_image = family.guided_rows_per_image(reference.config)
            batch_flag = args.batch or defaults["batch"]
            takes = ((lambda rows: any(rows in p.batch for p in profiles)) if args.engine == "trt"
                     else (lambda rows: rows in union(profiles).batch))  # one graph over the profiles' union
            if not takes(rows_per_image) and not takes(1):
                guided = f"{rows_per_image} (guided) or 1" if rows_per_image > 1 else "1"
                raise SlimDiffError(f"--batch {batch_flag}: the served {type(pipe).__name__} draws one image a "
                                    f"request, a {family.component} batch of {guided}: give a --batch that takes "
                                    f"{rows_per_image}")
            if not takes(rows_per_image):
                status(f"note: --batch {batch_flag} leaves out the {rows_per_image} {family.component} rows the "
                       f"served {type(pipe).__name__} runs per image under classifier-free guidance: the repository "
                       "answers only requests with guidance_scale <= 1 (a request's default is "
                       f"{REQUEST_DEFAULTS['guidance_scale']}); give --batch {rows_per_image} to serve guided "
                       "requests")
        export_options = _export_options(args, family, controlnet, pipe)
        # what the denoiser's graph can serve, before any slow work
        component_axes(denoiser_component(reference, export_options, family), union(profiles),
                       {"height": multiple, "width": multiple})
        # the sampling calibration will run, made (and so checked: a refiner's --base loads here) after the cheap
        # shape checks, before any engine is built
        calibration_loop = _calibration_loop(pipe, args, slimming)
        _check_room(tmp, args, backend, dense, slim, slimming, dtype,
                    [m for m in (controlnet, refiner.unet if refiner is not None else None) if m is not None])
        status(f"{len(profiles)} shape profile(s): " + " | ".join(p.describe() for p in profiles))
        build = {"profiles": profiles, "kind": args.engine, "device": device, "dtype": dtype, "opset": opset,
                 "multiple": multiple}
        rows = []
        if dense is not None and not args.slim_only:
            if args.jobs == 2:
                threads = torch.get_num_threads()  # shared between the two processes while both run
                status("building the dense engine in a second process (--jobs 2)")
                dense_process = _SecondProcess(_dense_variant_in_process, args, tmp / "dense", build, export_options,
                                               max(1, threads // 2))
                torch.set_num_threads(max(1, threads - threads // 2))
            else:
                rows.append(_build_variant(args, "dense", dense, None, tmp / "dense", family=family,
                                           export_options=export_options, **build))
        slim_folder = (slim_source or Path(args.model)).resolve()
        if slim is None:
            status(f"slimming the {family.component} (budget {args.budget})")
            plan = _slim_dense_model(pipe, args, slimming, calibration_loop)
            calibration_loop = None  # a refiner's base pipeline is no longer needed
            slim, slim_folder = family.denoiser(pipe), tmp / "slim-unet"
        rows.append(_build_variant(args, "slim", slim, plan, tmp / "slim", family=family,
                                   export_options=export_options, **build))
        if dense_process is not None:
            rows.insert(0, dense_process.result())
            torch.set_num_threads(threads)
        if controlnet is not None:
            rows.append(_build_controlnet(args, controlnet, tmp / "controlnet", **build))
        if refiner is not None:
            rows.append(_build_variant(args, "refiner", refiner.unet, refiner_plan, tmp / "refiner",
                                       export_options=export_options, **{**build, **refiner_build}))
        if slim_folder == tmp / "slim-unet":
            _save_slim_unet(slim, plan, slim_folder, args)
        if repo_tmp is not None:
            _write_triton_repository(args, pipe, controlnet, refiner, tmp, repo_tmp, **build)
        print(format_table(rows))
        by_variant = {r["variant"]: r for r in rows}
        if "dense" in by_variant and "slim" in by_variant:
            dense_p, slim_p = by_variant["dense"]["parameters"], by_variant["slim"]["parameters"]
            print(f"slim {family.component}: {slim_p:,} of {dense_p:,} parameters "
                  f"({100 * (1 - slim_p / dense_p):.1f} % fewer)")
        write_json_atomic(tmp / EXPORT_FILE, {
            "format": EXPORT_FORMAT, "model": args.model, "engine": args.engine, "device": device,
            # what `slimdiff bench --model OUT` times: the dense source, and the slim UNet beside its engine
            "dense_model": None if dense is None else _source(args.model),
            "slim_model": "slim-unet" if slim_folder == tmp / "slim-unet" else str(slim_folder),
            "dtype": str(dtype).removeprefix("torch."), "opset": opset if args.engine != "aoti" else None,
            "profiles": [p.to_json() for p in profiles], "rows": rows, "arguments": vars(args),
            # the engines are the denoiser's; the text encoder(s) and the VAE stay in PyTorch (with --triton-repo
            # a UNet pipeline's get engines too, beside the repository)
            "denoiser": family.component,
            "pytorch_components": [] if repo_tmp is not None else
            [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
             if getattr(pipe, name, None) is not None],
            "versions": {"torch": torch.__version__}, "seconds": round(time.perf_counter() - start, 1)})
        commit_output_dir(tmp, out)
        if repo_tmp is not None and not repo_inside_out:
            commit_output_dir(repo_tmp, Path(args.triton_repo))
    finally:
        if dense_process is not None:
            dense_process.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if repo_tmp is not None:
            shutil.rmtree(repo_tmp, ignore_errors=True)
    status(f"engines written to {out} in {time.perf_counter() - start:.0f} s")
    if args.triton_repo:
        status(f"serve the Triton repository with `tritonserver --model-repository {Path(args.triton_repo).resolve()}`"
               " (its python models import slimdiff: the server's Python needs it; README: Serve with Triton "
               "Inference Server)")
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_command("slimdiff-export", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
