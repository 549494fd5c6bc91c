"""``python -m poolkit``: the same as the ``poolkit`` command."""

from poolkit.cli import main

raise SystemExit(main())
