"""The ``slimdiff`` command (``slimdiff.cli.main``); ``slimdiff-export``'s lives in :mod:`slimdiff.cli.export`,
``slimdiff bench``'s in :mod:`slimdiff.bench.cli` and ``slimdiff eval``'s in :mod:`slimdiff.quality.cli`."""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
