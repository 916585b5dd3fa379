"""How a command ends and talks: user errors as one line and an exit status, SIGTERM handled like Ctrl-C,
warnings as single lines.

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


def run_command(prog: str, func, args) -> int:
    """Run one command; a user error or an interrupt becomes one line on stderr and an exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for a hub
    # transformers ≥ 5 warns on importing diffusers' SD pipelines that their CLIP image processor falls back to PIL
    # without torchvision: two lines on every command about a component slimdiff never loads
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    try:
        with sigterm_as_interrupt(), one_line_warnings(prog):
            func(args)
    except SlimDiffError as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
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
