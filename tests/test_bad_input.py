"""The bad-input table (README "What slimdiff says when the input is wrong"): every row ends with exit status 2
(a SlimDiffError in the API), one line naming the problem, no traceback, and nothing left behind.

CLI rows run in-process (``main(argv)``) to keep CI fast; SIGTERM needs a real process.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimdiff import cli
from slimdiff.bench import cli as bench_cli
from slimdiff.errors import SlimDiffError
from slimdiff.cli import export as export_cli
from slimdiff.models import build_builtin
from slimdiff.serialization import WEIGHTS_FILE

FAST = ["--num-prompts", "3", "--steps", "2", "--pass1-prompts", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by the rows (read-only): statistics and a slim folder of builtin:tiny, prompt files, a
    pipeline folder of another model."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "prompts.txt").write_text("a red cube\na blue ball\na green cone\n", encoding="utf-8")
    assert cli.main(["calibrate", "--model", "builtin:tiny", "--prompts", str(root / "prompts.txt"), *FAST,
                     "--out", str(root / "stats")]) == 0
    assert cli.main(["slim", "--model", "builtin:tiny", "--stats", str(root / "stats"), "--budget", "0.3",
                     "--out", str(root / "slim")]) == 0
    other = build_builtin("builtin:tiny")
    with torch.no_grad():
        other.unet.mid_block.attentions[0].transformer_blocks[0].ff.net[2].weight.mul_(1.5)
    other.save_pretrained(root / "other-model")
    # an InstructPix2Pix pipeline folder: its UNet takes the input image's latent beside the latent
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    from slimdiff.configs import TINY_UNET

    pix2pix = UNet2DConditionModel(**dict(TINY_UNET, in_channels=8))
    StableDiffusionInstructPix2PixPipeline(**{**other.components, "unet": pix2pix}).save_pretrained(root / "pix2pix")
    # a ControlNet made for another UNet (tiny-xl's)
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(build_builtin("builtin:tiny-xl").unet).save_pretrained(root / "controlnet-xl")
    # builtin:tiny's architecture, but made from an inpainting UNet (9 input channels): the pipelines pass it 4
    ControlNetModel.from_unet(UNet2DConditionModel(**dict(TINY_UNET, in_channels=9))).save_pretrained(
        root / "controlnet-9ch")
    return root


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _corrupt_manifest(stats: Path) -> None:
    (stats / "manifest.json").write_text("{not json", encoding="utf-8")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _poison_statistics(stats: Path) -> None:
    manifest = json.loads((stats / "manifest.json").read_text())
    tensors_file = stats / manifest["pass2"]["file"]
    tensors = load_file(str(tensors_file))
    key = sorted(k for k in tensors if k.endswith(".q_gram"))[0]
    tensors[key][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(tensors_file))


def _incomplete(stats: Path) -> None:
    manifest = json.loads((stats / "manifest.json").read_text())
    manifest["complete"] = False
    (stats / "manifest.json").write_text(json.dumps(manifest))


def _swap_weights(slim: Path) -> None:
    """The slim folder's weights replaced by the dense UNet's: a header that is intact but does not fit the plan."""
    save_file(build_builtin("builtin:tiny").unet.state_dict(), str(slim / WEIGHTS_FILE))


# (id, argv builder, setup on the per-row folder, expected fragment of the one error line).
# In argv: {in} = shared inputs folder, {tmp} = this row's folder (checked to be unchanged afterwards).
SLIMDIFF_ROWS = [
    ("calibrate-prompts-is-a-folder", ["calibrate", "--model", "builtin:tiny", "--prompts", "{in}", *FAST,
                                       "--out", "{tmp}/stats"], None,
     "prompt file '{in}' is a folder: give a .txt, .csv/.tsv or COCO captions .json file"),
    ("slim-exclude-matches-nothing", ["slim", "--model", "builtin:tiny", *FAST, "--budget", "0.3", "--exclude", "ffn",
                                      "atn2", "--out", "{tmp}/slim"], None,
     "exclude pattern 'atn2' matches no compressible module: give a kind (ffn, qk, vo) or a fragment of a module name "
     "such as 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.qk'"),
    ("calibrate-resolution-off-the-grid", ["calibrate", "--model", "builtin:tiny", *FAST, "--resolution", "100",
                                           "--out", "{tmp}/stats"], None,
     "image height 100 px: StableDiffusionPipeline takes positive multiples of 8 px (VAE scale 2 × latent multiple 4)"),
    ("calibrate-a-slim-folder", ["calibrate", "--model", "{in}/slim", *FAST, "--out", "{tmp}/stats"], None,
     "is slim already: calibrate the dense model it was slimmed from (builtin:tiny); slimming takes dense models"),
    ("slim-a-slim-folder-again", ["slim", "--model", "{in}/slim", *FAST, "--budget", "0.3", "--out", "{tmp}/slim"],
     None, "this SlimUNet2DConditionModel is slim already (slimmed from builtin:tiny): slim builtin:tiny instead"),
    ("slim-resolution-zero", ["slim", "--model", "builtin:tiny", *FAST, "--resolution", "0", "--budget", "0.3",
                              "--out", "{tmp}/slim"], None, "image height 0 px"),
    ("calibrate-pickled-text-encoder", ["calibrate", "--model", "{tmp}/pickled", *FAST, "--out", "{tmp}/stats"],
     "pickled-component", "text_encoder/ holds its weights only as pickles (pytorch_model.bin), which are not loaded"),
    ("calibrate-pipeline-without-its-vae", ["calibrate", "--model", "{tmp}/incomplete", *FAST, "--out",
                                            "{tmp}/stats"], "no-vae",
     "is a StableDiffusionPipeline folder without vae (calibration samples images through the pipeline): the folder "
     "is incomplete"),
    ("slim-pipeline-without-its-tokenizer", ["slim", "--model", "{tmp}/incomplete", *FAST, "--budget", "0.3",
                                             "--out", "{tmp}/slim"], "no-tokenizer",
     "is a StableDiffusionPipeline folder without tokenizer"),
    ("calibrate-pipeline-with-truncated-unet-weights", ["calibrate", "--model", "{tmp}/truncated", *FAST, "--out",
                                                        "{tmp}/stats"], "truncated-unet",
     "the file is damaged or cut short (Error while deserializing header"),
    ("calibrate-a-pipelines-unet-folder", ["calibrate", "--model", "{in}/other-model/unet", *FAST, "--out",
                                           "{tmp}/stats"], None,
     "is one component of a pipeline (UNet2DConditionModel, config.json), not a pipeline: slimdiff samples with the "
     "whole pipeline; "
     "pass the pipeline folder it belongs to ('{in}/other-model')"),
    ("calibrate-out-under-a-file", ["calibrate", "--model", "builtin:tiny", *FAST, "--out", "{tmp}/file/stats"],
     "file", "'{tmp}/file' is a file, not a folder"),
    ("calibrate-out-is-a-file", ["calibrate", "--model", "builtin:tiny", *FAST, "--out", "{tmp}/file"],
     "file", "is a file, not a folder"),
    ("calibrate-empty-prompt-file", ["calibrate", "--model", "builtin:tiny", "--prompts", "{tmp}/empty.txt",
                                     *FAST, "--out", "{tmp}/stats"], "empty", "contains no prompts"),
    ("calibrate-non-utf8-prompt-file", ["calibrate", "--model", "builtin:tiny", "--prompts", "{tmp}/latin1.txt",
                                        *FAST, "--out", "{tmp}/stats"], "latin1", "is not UTF-8 text"),
    ("calibrate-onnx-as-model", ["calibrate", "--model", "{tmp}/unet.onnx", *FAST, "--out", "{tmp}/stats"],
     "onnx", "is an ONNX model"),
    ("calibrate-export-output-as-model", ["calibrate", "--model", "{tmp}/engines", *FAST, "--out", "{tmp}/stats"],
     "export-output", "'{tmp}/engines' is the output of slimdiff-export (export.json), not a source model: pass the "
                      "model it was exported from (builtin:tiny) or its slim folder ({tmp}/engines/slim-unet)"),
    ("eval-engine-folder-as-slim", ["eval", "--model", "builtin:tiny", "--slim", "{tmp}/engines/slim", "--out",
                                    "{tmp}/eval"], "export-output",
     "'{tmp}/engines/slim' is an engine folder (unet.engine.json, written by slimdiff-export), not a source model"),
    ("calibrate-pickle-as-model", ["calibrate", "--model", "{tmp}/model.ckpt", *FAST, "--out", "{tmp}/stats"],
     "ckpt", "pickle checkpoint"),
    ("calibrate-missing-model", ["calibrate", "--model", "{tmp}/nowhere", *FAST, "--out", "{tmp}/stats"],
     None, "does not exist"),
    ("calibrate-pix2pix-model", ["calibrate", "--model", "{in}/pix2pix", *FAST, "--out", "{tmp}/stats"],
     None, "takes 8 input channels (4 latent + 4 of image conditioning"),
    ("calibrate-missing-lora", ["calibrate", "--model", "builtin:tiny", "--lora", "{tmp}/style.safetensors", *FAST,
                                "--out", "{tmp}/stats"], None, "LoRA file '{tmp}/style.safetensors' does not exist"),
    ("calibrate-base-for-a-text-to-image-model", ["calibrate", "--model", "builtin:tiny", "--base", "builtin:tiny-xl",
                                                  *FAST, "--out", "{tmp}/stats"], None,
     "a base model given (--base), but StableDiffusionPipeline is no refiner"),
    # every --base refusal is tests/test_sdxl_refiner.py's (REFUSALS, through `slimdiff slim`); one stands here
    ("calibrate-base-and-images", ["calibrate", "--model", "builtin:tiny-xl-refiner", "--base", "builtin:tiny-xl",
                                   "--images", "{in}", *FAST, "--out", "{tmp}/stats"], None,
     "either on the base model's latents (--base) or on photographs (--images, --strength), not both"),
    ("slim-pickled-lora", ["slim", "--model", "builtin:tiny", "--stats", "{in}/stats", "--lora", "{tmp}/model.ckpt",
                           "--budget", "0.3", "--out", "{tmp}/slim"], "ckpt", "is not a .safetensors file"),
    ("calibrate-resume-other-model", ["calibrate", "--model", "{in}/other-model", "--prompts", "{in}/prompts.txt",
                                      *FAST, "--out", "{tmp}/stats"], "copy-stats", "belong to a different model"),
    ("slim-stats-with-base", ["slim", "--model", "builtin:tiny-xl-refiner", "--stats", "{in}/stats", "--base",
                              "builtin:tiny-xl", "--budget", "0.3", "--out", "{tmp}/slim"], None,
     "--base say what calibration samples, but --stats gives statistics collected already: leave them out"),
    ("slim-budget-below-one-step", ["slim", "--model", "builtin:tiny", "--stats", "{in}/stats", "--budget", "2",
                                    "--out", "{tmp}/slim"], None, "less than one alignment step"),
    ("slim-budget-above-compressible", ["slim", "--model", "builtin:tiny", "--stats", "{in}/stats", "--budget",
                                        "0.99", "--out", "{tmp}/slim"], None, "can give up with r_min=8"),
    ("slim-budget-amount-too-large", ["slim", "--model", "builtin:tiny", "--stats", "{in}/stats", "--budget",
                                      "100M", "--out", "{tmp}/slim"], None, "can give up"),
    ("slim-stats-corrupt-manifest", ["slim", "--model", "builtin:tiny", "--stats", "{tmp}/stats", "--budget", "0.3",
                                     "--out", "{tmp}/slim"], "corrupt-manifest", "corrupt statistics manifest"),
    ("slim-stats-truncated-tensors", ["slim", "--model", "builtin:tiny", "--stats", "{tmp}/stats", "--budget",
                                      "0.3", "--out", "{tmp}/slim"], "truncated-stats", "corrupt statistics"),
    ("slim-stats-nan", ["slim", "--model", "builtin:tiny", "--stats", "{tmp}/stats", "--budget", "0.3",
                        "--out", "{tmp}/slim"], "nan-stats", "NaN or Inf"),
    ("slim-stats-incomplete", ["slim", "--model", "builtin:tiny", "--stats", "{tmp}/stats", "--budget", "0.3",
                               "--out", "{tmp}/slim"], "incomplete-stats", "are incomplete"),
    ("slim-stats-of-another-model", ["slim", "--model", "{in}/other-model", "--stats", "{in}/stats", "--budget",
                                     "0.3", "--out", "{tmp}/slim"], None, "different model"),
    ("slim-stats-not-a-stats-folder", ["slim", "--model", "builtin:tiny", "--stats", "{tmp}", "--budget", "0.3",
                                       "--out", "{tmp}/slim"], None, "is not a statistics directory"),
    ("slim-out-exists", ["slim", "--model", "builtin:tiny", "--stats", "{in}/stats", "--budget", "0.3",
                         "--out", "{tmp}/existing"], "existing", "already exists (use --force"),
    ("slim-out-under-a-file", ["slim", "--model", "builtin:tiny", "--stats", "{in}/stats", "--budget", "0.3",
                               "--out", "{tmp}/file/a/b"], "file", "is a file, not a folder"),
    ("slim-out-read-only", ["slim", "--model", "builtin:tiny", "--stats", "{in}/stats", "--budget", "0.3",
                            "--out", "{tmp}/slim"], "read-only", "Read-only file system"),
    ("slim-disk-full-during-save", ["slim", "--model", "builtin:tiny", "--stats", "{in}/stats", "--budget", "0.3",
                                    "--out", "{tmp}/slim"], "disk-full", "No space left on device"),
    ("inspect-truncated-weights", ["inspect", "{tmp}/slim"], "truncated-slim", "is damaged"),
    ("inspect-weights-not-matching-plan", ["inspect", "{tmp}/slim"], "swapped-slim", "does not match its plan"),
    ("inspect-not-a-slim-folder", ["inspect", "{tmp}"], None, "not a slim model folder"),
    ("bench-out-under-a-file", ["bench", "--model", "builtin:tiny", "--out", "{tmp}/file/report"], "file",
     "is a file, not a folder"),
    ("bench-latency-table-is-a-folder", ["bench", "--model", "builtin:tiny", "--latency-table", "{tmp}"], None,
     "is a folder; give a file name"),
    ("eval-out-under-a-file", ["eval", "--model", "builtin:tiny", "--slim", "{in}/slim", "--prompts",
                               "{in}/prompts.txt", "--out", "{tmp}/file/report"], "file", "is a file, not a folder"),
    ("eval-non-utf8-prompt-file", ["eval", "--model", "builtin:tiny", "--slim", "{in}/slim", "--prompts",
                                   "{tmp}/latin1.txt", "--out", "{tmp}/report"], "latin1", "is not UTF-8 text"),
    ("eval-resolution-off-the-grid", ["eval", "--model", "builtin:tiny", "--slim", "{in}/slim", "--prompts",
                                      "{in}/prompts.txt", "--resolution", "100", "--out", "{tmp}/report"], None,
     "image height 100 px: StableDiffusionPipeline takes positive multiples of 8 px"),
    ("calibrate-device-torch-has-but-slimdiff-does-not-run-on", ["calibrate", "--model", "builtin:tiny", *FAST,
                                                                 "--device", "mps", "--out", "{tmp}/stats"], None,
     "--device mps: slimdiff runs on cpu or cuda"),
    ("bench-device-no-such-cuda-device", ["bench", "--model", "builtin:tiny", "--device", "cuda:9", "--out",
                                          "{tmp}/report"], None, "--device cuda:9"),
    ("eval-device-not-a-device", ["eval", "--model", "builtin:tiny", "--slim", "{in}/slim", "--prompts",
                                  "{in}/prompts.txt", "--device", "gpu", "--out", "{tmp}/report"], None,
     "--device 'gpu' is not a device: give cpu, cuda or cuda:N"),
    ("eval-grid-of-no-columns", ["eval", "--model", "builtin:tiny", "--slim", "{in}/slim", "--prompts",
                                 "{in}/prompts.txt", "--grid", "0", "--out", "{tmp}/report"], None,
     "--grid is the grid's number of columns, at least 1: got 0"),
    ("eval-slim-and-dense-swapped", ["eval", "--model", "{in}/slim", "--slim", "builtin:tiny", "--prompts",
                                     "{in}/prompts.txt", "--out", "{tmp}/report"], None,
     "--model '{in}/slim' is a slim model: --model takes the dense model (this one was slimmed from builtin:tiny), "
     "--slim the slim one"),
    ("eval-strength-for-a-control-model", ["eval", "--model", "builtin:tiny-flux-control", "--slim",
                                           "builtin:tiny-flux-control", "--prompts", "{in}/prompts.txt", "--strength",
                                           "0.5", "--out", "{tmp}/report"], None, "noises no image"),
]

EXPORT_ROWS = [
    ("export-slim-folder-with-images", ["--model", "{in}/slim", "--engine", "ort", "--images", "{in}", "--strength",
                                        "0.5", "--out", "{tmp}/engines"], None,
     "--images and --strength say what calibration samples, but"),
    ("export-out-under-a-file", ["--model", "builtin:tiny", "--engine", "ort", "--out", "{tmp}/file/engines"],
     "file", "is a file, not a folder"),
    ("export-budget-below-one-step", ["--model", "builtin:tiny", "--engine", "ort", "--budget", "2", *FAST,
                                      "--out", "{tmp}/engines"], None, "less than one alignment step"),
    ("export-stats-nan", ["--model", "builtin:tiny", "--engine", "ort", "--stats", "{tmp}/stats",
                          "--out", "{tmp}/engines"], "nan-stats", "NaN or Inf"),
    ("export-stats-of-another-model", ["--model", "{in}/other-model", "--engine", "ort", "--stats", "{in}/stats",
                                       "--out", "{tmp}/engines"], None, "different model"),
    ("export-non-utf8-prompt-file", ["--model", "builtin:tiny", "--engine", "ort", "--prompts", "{tmp}/latin1.txt",
                                     *FAST, "--out", "{tmp}/engines"], "latin1", "is not UTF-8 text"),
    ("export-missing-lora", ["--model", "builtin:tiny", "--engine", "ort", "--lora", "{tmp}/style.safetensors",
                             *FAST, "--out", "{tmp}/engines"], None, "does not exist"),
    ("export-lora-onto-a-slim-folder", ["--model", "{in}/slim", "--engine", "ort", "--stats", "{in}/stats", "--lora",
                                       "{tmp}/style.safetensors", "--out", "{tmp}/engines"], "lora",
     "is a slim folder made without --lora-maps"),
    ("export-triton-repo-is-out", ["--model", "builtin:tiny", "--engine", "ort", "--out", "{tmp}/engines",
                                   "--triton-repo", "{tmp}/engines", "--triton-mode", "python"], None,
     "give the repository a folder of its own"),
    ("export-out-inside-triton-repo", ["--model", "builtin:tiny", "--engine", "ort", "--out", "{tmp}/repo/engines",
                                       "--triton-repo", "{tmp}/repo", "--triton-mode", "python"], None,
     "give the repository a folder of its own"),
    ("export-controlnet-not-a-controlnet", ["--model", "builtin:tiny", "--engine", "ort", "--controlnet", "{in}/stats",
                                           "--out", "{tmp}/engines"], None, "is not a ControlNet folder"),
    ("export-controlnet-of-another-unet", ["--model", "builtin:tiny", "--engine", "ort", "--controlnet",
                                          "{in}/controlnet-xl", *FAST, "--out", "{tmp}/engines"], None,
     "was not made for this UNet"),
    ("export-controlnet-of-nine-channels", ["--model", "builtin:tiny", "--engine", "ort", "--controlnet",
                                           "{in}/controlnet-9ch", *FAST, "--out", "{tmp}/engines"], None,
     "takes 9 input channels; its pipeline passes it the 4-channel latent"),
    ("export-controlnet-on-a-one-output-runner", ["--model", "builtin:tiny", "--engine", "aoti", "--controlnet",
                                                  "{in}/controlnet-xl", "--out", "{tmp}/engines"], None,
     "runner returns one output: build it with --engine ort"),
    ("export-base-for-a-text-to-image-model", ["--model", "builtin:tiny", "--engine", "ort", "--base",
                                               "builtin:tiny-xl", *FAST, "--out", "{tmp}/engines"], None,
     "a base model given (--base), but StableDiffusionPipeline is no refiner"),
    ("export-base-not-an-sdxl-base", ["--model", "builtin:tiny-xl-refiner", "--engine", "ort", "--base",
                                      "builtin:tiny", *FAST, "--out", "{tmp}/engines"], None, "not an SDXL base"),
    ("export-device-torch-has-but-slimdiff-does-not-run-on", ["--model", "builtin:tiny", "--engine", "ort",
                                                              "--device", "xpu", "--out", "{tmp}/engines"], None,
     "--device xpu: slimdiff runs on cpu or cuda"),
    ("export-a-slim-folder-with-a-budget", ["--model", "{in}/slim", "--engine", "ort", "--budget", "0.2", "--out",
                                           "{tmp}/engines"], None,
     "is slim already and is exported as it is: leave out --budget (another budget: slim its dense model"),
    ("export-onnx-as-model", ["--model", "{tmp}/unet.onnx", "--engine", "ort", "--out", "{tmp}/engines"], "onnx",
     "is an ONNX model"),
]


def _setup(kind: str | None, tmp: Path, inputs: Path, monkeypatch) -> None:
    if kind == "file":
        (tmp / "file").write_text("a file where a folder is expected")
    elif kind == "empty":
        (tmp / "empty.txt").write_text("\n  \n")
    elif kind == "latin1":
        (tmp / "latin1.txt").write_bytes("une tête de chat\n".encode("latin-1"))
    elif kind == "onnx":
        (tmp / "unet.onnx").write_bytes(b"\x08\x07")
    elif kind == "export-output":  # what slimdiff-export writes, as far as a model loader looks
        (tmp / "engines" / "slim").mkdir(parents=True)
        (tmp / "engines" / "export.json").write_text(json.dumps({"format": "slimdiff-export/1",
                                                                 "dense_model": "builtin:tiny",
                                                                 "slim_model": "slim-unet"}))
        (tmp / "engines" / "slim" / "unet.engine.json").write_text("{}")
    elif kind == "pickled-component":  # an older hub folder: the text encoder as pytorch_model.bin only
        text_encoder = _copy_tree(inputs / "other-model", tmp / "pickled") / "text_encoder"
        (text_encoder / "model.safetensors").unlink()
        (text_encoder / "pytorch_model.bin").write_bytes(b"PK\x03\x04")  # never opened
    elif kind in ("no-vae", "no-tokenizer"):  # a component folder deleted or never copied; the index still lists it
        import shutil

        shutil.rmtree(_copy_tree(inputs / "other-model", tmp / "incomplete") / kind.removeprefix("no-"))
    elif kind == "truncated-unet":  # a copy or download cut short
        _truncate(_copy_tree(inputs / "other-model", tmp / "truncated") / "unet" / "diffusion_pytorch_model.safetensors")
    elif kind == "ckpt":
        (tmp / "model.ckpt").write_bytes(b"PK\x03\x04")
    elif kind == "lora":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
                  str(tmp / "style.safetensors"))
    elif kind == "copy-stats":
        _copy_tree(inputs / "stats", tmp / "stats")
    elif kind == "corrupt-manifest":
        _corrupt_manifest(_copy_tree(inputs / "stats", tmp / "stats"))
    elif kind == "truncated-stats":
        stats = _copy_tree(inputs / "stats", tmp / "stats")
        _truncate(stats / json.loads((stats / "manifest.json").read_text())["pass2"]["file"])
    elif kind == "nan-stats":
        _poison_statistics(_copy_tree(inputs / "stats", tmp / "stats"))
    elif kind == "incomplete-stats":
        _incomplete(_copy_tree(inputs / "stats", tmp / "stats"))
    elif kind == "existing":
        (tmp / "existing").mkdir()
        (tmp / "existing" / "mine.txt").write_text("keep me")
    elif kind == "read-only":
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    elif kind == "disk-full":
        from diffusers import ModelMixin

        def full(self, folder, *args, **kwargs):
            Path(folder, WEIGHTS_FILE).write_bytes(b"\x00" * 1024)  # part of a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder, WEIGHTS_FILE)))

        monkeypatch.setattr(ModelMixin, "save_pretrained", full)
    elif kind == "truncated-slim":
        _truncate(_copy_tree(inputs / "slim", tmp / "slim") / WEIGHTS_FILE)
    elif kind == "swapped-slim":
        _swap_weights(_copy_tree(inputs / "slim", tmp / "slim"))
    else:
        assert kind is None, kind


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()} | {
        str(p.relative_to(folder)) + "/": 0 for p in folder.rglob("*") if p.is_dir()}


def _check_row(main, prog, argv, kind, fragment, files, tmp_path, monkeypatch, capsys):
    _setup(kind, tmp_path, files, monkeypatch)
    before, shared_before = _snapshot(tmp_path), _snapshot(files)
    argv = [a.replace("{in}", str(files)).replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert fragment.replace("{tmp}", str(tmp_path)).replace("{in}", str(files)) in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "the failed run left something behind"
    assert _snapshot(files) == shared_before


@pytest.mark.parametrize("argv, kind, fragment", [row[1:] for row in SLIMDIFF_ROWS],
                         ids=[row[0] for row in SLIMDIFF_ROWS])
def test_slimdiff_bad_input(argv, kind, fragment, files, tmp_path, monkeypatch, capsys):
    _check_row(cli.main, "slimdiff", argv, kind, fragment, files, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("argv, kind, fragment", [row[1:] for row in EXPORT_ROWS],
                         ids=[row[0] for row in EXPORT_ROWS])
def test_export_bad_input(argv, kind, fragment, files, tmp_path, monkeypatch, capsys):
    def no_engine_work(*args, **kwargs):
        raise AssertionError("an engine was built before the bad input was noticed")

    monkeypatch.setattr(export_cli, "_build_variant", no_engine_work)
    _check_row(export_cli.main, "slimdiff-export", argv, kind, fragment, files, tmp_path, monkeypatch, capsys)


def test_bench_main_refuses_before_measuring(files, tmp_path, monkeypatch, capsys):
    from slimdiff.bench import harness

    def no_measuring(*args, **kwargs):
        raise AssertionError("the benchmark ran before the bad output was noticed")

    monkeypatch.setattr(harness, "run_bench", no_measuring)
    _check_row(bench_cli.main, "slimdiff bench", ["--model", "builtin:tiny", "--out", "{tmp}/file/report"], "file",
               "is a file, not a folder", files, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("flags, fragment", [
    (["--iters", "1"], "timed calls ≥ 2 (a speed-up interval needs pairs)"),
    (["--batch", "0"], "batch sizes must be positive"),
    (["--pad-heads", "0"], "--pad-heads must be a positive multiple, got 0"),
    (["--deadline", "-5"], "the deadline is seconds from the start, and must be positive: got -5.0"),
    (["--calib-prompts", "-1"], "calibration prompts must be ≥ 0 (0: synthetic plans) and calibration steps ≥ 1"),
    (["--calib-steps", "0"], "calibration prompts must be ≥ 0"),
], ids=["iters", "batch", "pad-heads", "deadline", "calib-prompts", "calib-steps"])
def test_bench_settings_out_of_range_are_refused_before_loading(flags, fragment, files, tmp_path, monkeypatch,
                                                                 capsys):
    from slimdiff.bench import harness

    monkeypatch.setattr(harness.Bench, "_load", lambda self: pytest.fail("the model loaded before the check"))
    _check_row(bench_cli.main, "slimdiff bench", ["--model", "builtin:tiny", "--no-e2e", *flags], None, fragment,
               files, tmp_path, monkeypatch, capsys)


def test_fewer_prompts_than_asked_is_one_warning_line(files, tmp_path, capsys):
    assert cli.main(["calibrate", "--model", "builtin:tiny", "--prompts", str(files / "prompts.txt"),
                     *FAST[:-4], "--num-prompts", "500", "--steps", "2", "--out", str(tmp_path / "stats")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["slimdiff: warning: the prompt pool has 3 distinct prompts, fewer than the 500 asked for "
                        "(--num-prompts): calibrating on all 3"]


def test_api_raises_slimdiff_errors(files, tmp_path):
    from slimdiff import Statistics, load_pipeline

    stats = _copy_tree(files / "stats", tmp_path / "stats")
    _poison_statistics(stats)
    with pytest.raises(SlimDiffError, match="NaN or Inf"):
        Statistics.load(stats)
    with pytest.raises(SlimDiffError, match="is an ONNX model"):
        _setup("onnx", tmp_path, files, None)
        load_pipeline(str(tmp_path / "unet.onnx"))
    with pytest.raises(SlimDiffError, match="different model"):
        Statistics.load(files / "stats").check_model(load_pipeline(str(files / "other-model")).unet)
    # a denoiser slimmed in place is not slimmed again, before any calibration
    from slimdiff import SlimConfig, slim_pipeline

    pipe = load_pipeline("builtin:tiny")
    slim_pipeline(pipe, SlimConfig(budget=0.3), stats=files / "stats", progress=False)
    with pytest.raises(SlimDiffError, match="this UNet2DConditionModel is slim already: slim the dense model it came from"):
        slim_pipeline(pipe, SlimConfig(budget=0.3), prompts=["a red cube"], num_prompts=1,
                      on_batch=lambda stage, done: pytest.fail("calibrated a slim model"))


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """A scheduler's cancel (SIGTERM) during calibration: exit 143, one line, no partial output folder."""
    out = tmp_path / "engines"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimdiff.cli.export", "--model", "builtin:tiny", "--engine", "ort",
                             "--slim-only", "--num-prompts", "400", "--steps", "20", "--out", str(out)],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".engines.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    time.sleep(1.0)  # well inside model loading / calibration
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert [line for line in err.splitlines() if "slimdiff-export:" in line] == ["slimdiff-export: terminated (SIGTERM)"]
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", [None, "{not json"], ids=["no-engine-metadata", "corrupt-engine-metadata"])
def test_use_engine_on_a_folder_that_holds_no_engine(tmp_path, content):
    from slimdiff.runtime import use_engine

    pipe = build_builtin("builtin:tiny")
    if content is not None:
        (tmp_path / "unet.engine.json").write_text(content)
    before = _snapshot(tmp_path)
    with pytest.raises(SlimDiffError) as info:
        use_engine(pipe, tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    assert _snapshot(tmp_path) == before and type(pipe.unet).__name__ == "UNet2DConditionModel"
