"""``python -m tests.conformance``: the conformance run (see runner.py)."""

import sys

from .runner import main

sys.exit(main())
