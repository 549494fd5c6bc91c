"""Public import path of poolkit's logging set-up; the code is in ``poolkit/obs/log.py``."""

from __future__ import annotations

from poolkit.obs.log import configure_globally

__all__ = ["configure_globally"]
