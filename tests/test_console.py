"""What a command prints besides its own lines: the libraries' warnings about things slimdiff does not use are left
out (torchao's kernels, torchvision's absence), their other warnings are not; and how it ends when its reader
leaves (``slimdiff inspect DIR | head``)."""

import os
import signal
import subprocess
import sys

# What every command does that makes the libraries talk: import diffusers' pipelines (and, through them,
# transformers and torchao, which comes with slimdiff[test]) and register torch's ONNX operators.
_COMMAND_IMPORTS = """
import logging
from slimdiff.console import quiet_library_noise
quiet_library_noise()
from diffusers import StableDiffusionPipeline
from torch.onnx._internal.exporter._registration import ONNXRegistry
ONNXRegistry.from_torchlib()
logging.getLogger("torchao").warning("another torchao warning")
"""
_NOISE = ("Failed to load", "is an Enum subclass", "Unable to import `torchao`", "requires torchvision",
          "torchvision is not installed")


def test_commands_leave_out_the_libraries_lines_about_what_slimdiff_does_not_use():
    done = subprocess.run([sys.executable, "-c", _COMMAND_IMPORTS], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    printed = done.stderr
    assert not [part for part in _NOISE if part in printed], printed
    assert "another torchao warning" in printed  # one message is dropped, not the logger


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path):
    """As ``cat`` does when ``head`` has read enough: exit status 128 + SIGPIPE, nothing on stderr (it said
    ``slimdiff: error: Broken pipe`` and exited 2)."""
    from export_support import slim_tiny_unet

    from slimdiff.serialization import save_slim

    save_slim(*slim_tiny_unet(), tmp_path / "slim")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command prints its first line
    try:
        done = subprocess.run([sys.executable, "-m", "slimdiff", "inspect", str(tmp_path / "slim")], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (128 + signal.SIGPIPE, "")
