#!/usr/bin/env python
"""Train the proxy text-to-image model (same as ``python -m slimdiff.proxy.train``); see ``--help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimdiff.proxy.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
