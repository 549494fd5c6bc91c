"""structlog for poolkit's own loggers: JSON lines in production, console output in development."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

# poolkit renders its events itself and hands the finished line to the stdlib logger "poolkit.*", so the
# app's logging configuration decides where they go, and structlog's global configuration stays the app's.
_global = False


def _renderer(development: bool) -> Any:
    if development:
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer()


def is_development() -> bool:
    return os.environ.get("POOLKIT_ENV", "production").lower() == "development"


def get_logger(name: str, *, development: bool | None = None) -> Any:
    """A structlog logger for a poolkit component (``name`` below ``poolkit.``)."""
    if _global:
        return structlog.get_logger(f"poolkit.{name}")
    dev = is_development() if development is None else development
    stdlib = logging.getLogger(f"poolkit.{name}")
    _ensure_handler()
    return structlog.wrap_logger(
        stdlib,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _renderer(dev),
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory_args=(),
    )


def _ensure_handler() -> None:
    """Give poolkit's events somewhere to go when the app configured no logging at all."""
    root = logging.getLogger()
    ours = logging.getLogger("poolkit")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(handler)
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.DEBUG if is_development() else logging.INFO)


def configure_globally() -> None:
    """Send poolkit's events through the app's own structlog configuration instead of poolkit's."""
    global _global  # noqa: PLW0603 - a process-wide switch the app flips once at start-up
    _global = True
