"""How a command ends and talks: user errors as one line and an exit status, SIGTERM handled like Ctrl-C,
warnings as single lines, and the libraries' lines about things slimdiff does not use left out.

A job scheduler cancels with SIGTERM; Python's default handler would end the process without running any
``finally`` block, so a half-written ``.OUT.partial-PID`` folder would stay behind. Turned into an exception,
SIGTERM unwinds the stack like Ctrl-C does and every cleanup runs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

from .errors import SlimDiffError, SlimDiffWarning


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """:class:`SlimDiffWarning` printed as ``prog: warning: message`` (one line) on stderr."""
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SlimDiffWarning):
                print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", SlimDiffWarning)
        yield


# (logger, part of the message): lines the libraries print on every command, at import or export, about things
# slimdiff does not use. One filter drops one message, so a logger's other warnings still show.
_LIBRARY_NOISE = (
    # transformers ≥ 5, importing diffusers' SD pipelines without torchvision: their CLIP image processor (which
    # slimdiff never loads) falls back to PIL
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    # diffusers and transformers import torchao whenever it is installed (slimdiff[bench], so every checkout that
    # runs the tests): its wheel's C++ kernels (float8, CUTLASS: GPU-only, built for another Python) fail to load,
    # and it registers enums with torch's pytree in a way torch now calls deprecated
    ("torchao", "Failed to load "),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
    # the ONNX exporter lists each torchvision operator it cannot register
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
)


class _DropMessage(logging.Filter):
    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in record.getMessage()


def quiet_library_noise() -> None:
    """Leave out of this process's output the library lines in ``_LIBRARY_NOISE``, and torch's deprecation warning
    about its own pytree classes that ONNX export raises. Process-wide: for the commands and their second process,
    not for the Python API, whose user owns the process's logging."""
    for name, part in _LIBRARY_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.part == part for f in logger.filters):
            logger.addFilter(_DropMessage(part))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def run_command(prog: str, func, args) -> int:
    """Run one command; a user error or an interrupt becomes one line on stderr and an exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for a hub
    quiet_library_noise()
    try:
        with sigterm_as_interrupt(), one_line_warnings(prog):
            func(args)
            sys.stdout.flush()  # a reader that left shows here, not as a traceback at exit
    except SlimDiffError as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader left (`slimdiff inspect DIR | head`): end quietly, as cat does
        # Later writes (Python flushes stdout at exit) go nowhere instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:  # the file system refused (disk full, permissions): no traceback, outputs cleaned up
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
