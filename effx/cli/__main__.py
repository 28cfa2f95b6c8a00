"""``python -m effx.cli``: the ``effx`` command."""

import sys

from . import main

sys.exit(main())
