"""structlog for poolkit's own loggers: JSON lines in production, console output in development."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

# poolkit renders its events itself and hands the finished line to the stdlib logger "poolkit.<component>",
# so the app's logging configuration decides where they go and structlog's global configuration stays the
# app's. Only configure_globally() changes that.
_global = False


def is_development(env: str | None = None) -> bool:
    """True for ``env="development"``, or when ``env`` is None and ``POOLKIT_ENV=development``."""
    value = env if env is not None else os.environ.get("POOLKIT_ENV", "production")
    return value.strip().lower() == "development"


def _renderer(development: bool) -> Any:
    if development:
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer()


class _Fallback(logging.Handler):
    """Writes poolkit's lines to stderr only while nothing else would: no handler on the way to the root.

    Deciding at emit time (not when the logger is made) means an app that configures logging after creating
    its pools gets each line once, through its own handlers, instead of twice.
    """

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        try:
            sys.stderr.write(record.getMessage() + "\n")
        except Exception:
            self.handleError(record)


def _install_fallback() -> None:
    ours = logging.getLogger("poolkit")
    if not any(isinstance(h, _Fallback) for h in ours.handlers):
        ours.addHandler(_Fallback())


class EventLogger:
    """A poolkit component's event logger (``slow_query``, ``pool_exhausted``, the dev query log).

    Lines go to the stdlib logger ``poolkit.<component>`` rendered as JSON (production) or console text
    (development), or through the app's structlog configuration once :func:`configure_globally` ran.
    """

    __slots__ = ("_name", "_own", "_stdlib")

    def __init__(self, component: str, *, development: bool) -> None:
        self._name = f"poolkit.{component}"
        self._stdlib = logging.getLogger(self._name)
        self._own = structlog.wrap_logger(
            self._stdlib,
            processors=[
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _renderer(development),
            ],
            wrapper_class=structlog.stdlib.BoundLogger,
        )
        _install_fallback()

    @property
    def name(self) -> str:
        """The stdlib logger name (``poolkit.pool``, ``poolkit.query``)."""
        return self._name

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if _global:
            structlog.get_logger(self._name).log(level, event, logger=self._name, **fields)
        elif self._stdlib.isEnabledFor(level):
            self._own.log(level, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log ``event`` at WARNING with ``fields``."""
        self._emit(logging.WARNING, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log ``event`` at INFO with ``fields``."""
        self._emit(logging.INFO, event, fields)


def get_logger(component: str, *, development: bool | None = None) -> EventLogger:
    """The event logger of a poolkit component; ``development`` defaults to ``POOLKIT_ENV``."""
    return EventLogger(component, development=is_development() if development is None else development)


def enable_query_log() -> None:
    """Let the dev query log (INFO on ``poolkit.query``) through unless the app set that logger's level."""
    query = logging.getLogger("poolkit.query")
    if query.level == logging.NOTSET:
        query.setLevel(logging.INFO)


def configure_globally(*, env: str | None = None, level: int | str = logging.INFO, file: TextIO | None = None) -> None:
    """Configure structlog for the whole app the way poolkit renders its events, and route them through it.

    Call once at start-up, instead of your own ``structlog.configure``: JSON lines in production,
    console output when ``env`` (default ``POOLKIT_ENV``) is ``development``; ISO UTC timestamps;
    context variables bound with ``structlog.contextvars`` (a request id) appear in poolkit's events too;
    events below ``level`` are dropped; lines go to ``file`` (default stderr).
    Without this call poolkit never touches structlog's global configuration.
    """
    global _global  # noqa: PLW0603 - a process-wide switch the app flips once at start-up
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        from poolkit.errors import ConfigError  # noqa: PLC0415 - only on this error path

        raise ConfigError(f"configure_globally(level={level!r}): use a logging level such as 'INFO' or 'DEBUG'")
    development = is_development(env)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if not development:
        processors.append(structlog.processors.dict_tracebacks)
    processors.append(_renderer(development))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=file or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _global = True
