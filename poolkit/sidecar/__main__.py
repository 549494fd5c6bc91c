"""``python -m poolkit.sidecar``: the same as ``poolkit sidecar``."""

from __future__ import annotations

import sys

from poolkit.sidecar.service.cli import main

sys.exit(main())
