"""Per-pool instrumentation: the metrics, the ``slow_query`` / ``pool_exhausted`` events and the dev query log."""

from __future__ import annotations

import time
from typing import Any

from poolkit.errors import ConnectError, PoolTimeout
from poolkit.log import get_logger
from poolkit.metrics import PoolInstruments
from poolkit.translate import sqlstate_of


def _sql_text(query: Any) -> str:
    if isinstance(query, str):
        return query
    if isinstance(query, bytes):
        return query.decode("utf-8", "replace")
    return type(query).__name__  # psycopg sql.Composed: rendering it needs a connection; the type is enough


def normalized(query: Any) -> str:
    """SQL for a log line: literals replaced, length capped, never parameters."""
    from poolkit.sqlnorm import normalize  # noqa: PLC0415 - only needed for the rare slow/logged query

    return normalize(_sql_text(query))


class Observer:
    """Counts and logs what one pool does. Shared by the pool and the driver hooks of its connections."""

    __slots__ = (
        "_log",
        "closing",
        "driver",
        "inst",
        "last_connect_error",
        "last_connect_error_at",
        "name",
        "query_log",
        "route",
        "slow",
    )

    def __init__(self, name: str, driver: str, route: str, *, slow_query_seconds: float, query_log: bool) -> None:
        self.name = name
        self.driver = driver
        self.route = route
        self.slow = slow_query_seconds
        self.query_log = query_log
        self.inst = PoolInstruments(name, driver, route)
        self._log = get_logger("pool")
        self.closing = False
        self.last_connect_error: ConnectError | None = None
        self.last_connect_error_at = 0.0

    def query(self, query: Any, elapsed: float, exc: BaseException | None) -> None:
        """Record one statement; called by the driver hooks after it finished."""
        self.inst.query_duration.observe(elapsed)
        if exc is not None:
            self.inst.query_error(sqlstate_of(exc))
        if elapsed >= self.slow:
            self.inst.slow_queries.inc()
            self._log.warning(
                "slow_query",
                duration_s=round(elapsed, 6),
                threshold_s=self.slow,
                pool=self.name,
                route=self.route,
                driver=self.driver,
                sql=normalized(query),
            )
        elif self.query_log:
            self._log.debug(
                "query", duration_s=round(elapsed, 6), pool=self.name, route=self.route, sql=normalized(query)
            )

    def asyncpg_query(self, record: Any) -> None:
        """asyncpg query-logger callback (``LoggedQuery``); its ``args`` are never read."""
        self.query(record.query, record.elapsed, record.exception)

    def opened(self, elapsed: float) -> None:
        self.inst.opened.inc()
        self.inst.connect_duration.observe(elapsed)

    def connect_failed(self, error: ConnectError) -> None:
        self.inst.connect_error(error.reason)
        self.last_connect_error = error
        self.last_connect_error_at = time.monotonic()

    def recent_connect_error(self, within: float) -> ConnectError | None:
        if self.last_connect_error and time.monotonic() - self.last_connect_error_at <= within:
            return self.last_connect_error
        return None

    def closed(self, reason: str) -> None:
        self.inst.closed("shutdown" if self.closing else reason)

    def exhausted(self, error: PoolTimeout, *, in_use: int, hint: str) -> None:
        self.inst.acquire_timeouts.inc()
        self._log.warning(
            "pool_exhausted",
            pool=self.name,
            route=self.route,
            driver=self.driver,
            size=error.max_size,
            in_use=in_use,
            waiting=error.waiting,
            timeout_s=error.timeout,
            hint=hint,
        )
