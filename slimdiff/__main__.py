"""``python -m slimdiff``: the ``slimdiff`` command, also the entry point for ``torchrun -m slimdiff calibrate``."""

import sys

from .cli import main

sys.exit(main())
