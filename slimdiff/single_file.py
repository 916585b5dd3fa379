"""Single-file checkpoints: what a file is, and what ``--model`` accepts instead."""

from __future__ import annotations

from pathlib import Path

ACCEPTED_MODELS = ("a built-in name (builtin:tiny, builtin:proxy, builtin:sd15-shape), a diffusers pipeline folder "
                   "(with model_index.json), an original-layout .safetensors checkpoint, or a slim folder written "
                   "by `slimdiff slim`")

# What a user most often passes by mistake, by suffix.
_KNOWN_SUFFIXES = {
    ".onnx": "an ONNX model (an export output, not a source model)",
    ".plan": "a TensorRT engine (an export output, not a source model)",
    ".engine": "a TensorRT engine (an export output, not a source model)",
    ".pt2": "an AOTInductor package (an export output, not a source model)",
    ".ckpt": "a pickle checkpoint (not loaded: unpickling can run code; convert it to .safetensors)",
    ".pt": "a pickle checkpoint (not loaded: unpickling can run code; convert it to .safetensors)",
    ".pth": "a pickle checkpoint (not loaded: unpickling can run code; convert it to .safetensors)",
    ".bin": "a pickle checkpoint (not loaded: unpickling can run code; convert it to .safetensors)",
    ".json": "a JSON file (pass the folder that holds it)",
    ".yaml": "a YAML file (an original training config is not needed: pass the checkpoint)",
}


def unsupported_file_message(source: str) -> str:
    """One line: what ``source`` is, and what ``--model`` accepts."""
    kind = _KNOWN_SUFFIXES.get(Path(source).suffix.lower(), f"a {Path(source).suffix or 'suffix-less'} file")
    return f"--model {source!r} is {kind}; --model takes {ACCEPTED_MODELS}"
