"""``python -m chunkllama ...`` is the ``chunkllama`` command."""

import sys

from .cli import main

sys.exit(main())
