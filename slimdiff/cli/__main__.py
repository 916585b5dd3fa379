"""``python -m slimdiff.cli``: the ``slimdiff`` command."""

import sys

from .commands import main

sys.exit(main())
