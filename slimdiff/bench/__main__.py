"""``python -m slimdiff.bench …`` — the same as ``slimdiff bench …``."""

import sys

from .cli import main

sys.exit(main())
