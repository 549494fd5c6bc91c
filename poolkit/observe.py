"""Per-pool instrumentation: metrics, the ``slow_query`` / ``pool_exhausted`` events, the dev query log."""

from __future__ import annotations

import time
from typing import Any

from poolkit.errors import ConnectError, PoolTimeout
from poolkit.log import enable_query_log, get_logger, is_development
from poolkit.metrics import PoolInstruments
from poolkit.translate import sqlstate_of


def _reset_queries() -> frozenset[str]:
    # Every reset statement asyncpg's Connection.get_reset_query() can build (one per server-capability
    # mix): a set lookup on the (hash-cached) string costs less than anything that would ask the connection.
    parts = ("SELECT pg_advisory_unlock_all();", "CLOSE ALL;", "UNLISTEN *;", "RESET ALL;")
    found = set()
    for mask in range(1, 1 << len(parts)):
        found.add("\n".join(p for i, p in enumerate(parts) if mask >> i & 1))
    return frozenset(found)


_ASYNCPG_RESET_QUERIES = _reset_queries()


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
    """Counts and logs what one pool does. Shared by the pool and the driver hooks of its connections.

    ``query_log`` (every statement with its duration, INFO on ``poolkit.query``) is honoured only when the
    pool runs in development (``env="development"`` / ``POOLKIT_ENV=development``): it writes one line per
    statement, which a production service cannot afford and its log pipeline should not carry. Asked for in
    production, it stays off and a ``query_log_ignored`` warning says so once per pool.
    """

    __slots__ = (
        "_log",
        "_observe",
        "_qlog",
        "closing",
        "development",
        "driver",
        "inst",
        "last_connect_error",
        "last_connect_error_at",
        "name",
        "query_log",
        "route",
        "slow",
    )

    def __init__(
        self,
        name: str,
        driver: str,
        route: str,
        *,
        slow_query_seconds: float,
        query_log: bool,
        env: str | None = None,
    ) -> None:
        self.name = name
        self.driver = driver
        self.route = route
        self.slow = slow_query_seconds
        self.development = is_development(env)
        self.inst = PoolInstruments(name, driver, route)
        self._observe = self.inst.query_duration.observe
        self._log = get_logger("pool", development=self.development)
        self._qlog = get_logger("query", development=self.development)
        self.query_log = query_log and self.development
        if self.query_log:
            enable_query_log()
        elif query_log:
            self._log.warning(
                "query_log_ignored",
                pool=self.name,
                hint="the query log (every statement) is development-only: set POOLKIT_ENV=development "
                "(or env='development') to see it, or unset POOLKIT_QUERY_LOG",
            )
        self.closing = False
        self.last_connect_error: ConnectError | None = None
        self.last_connect_error_at = 0.0

    def query(self, query: Any, elapsed: float, exc: BaseException | None) -> None:
        """Record one statement; called by the driver hooks after it finished. Parameters are never passed."""
        if query == "":
            return  # psycopg_pool's check_connection ping on every checkout: the pool's, not the app's
        self._observe(elapsed)
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
        if self.query_log:
            self._qlog.info(
                "query",
                duration_s=round(elapsed, 6),
                pool=self.name,
                route=self.route,
                driver=self.driver,
                sql=normalized(query),
                error=None if exc is None else type(exc).__name__,
            )

    def asyncpg_query(self, record: Any) -> None:
        """asyncpg query-logger callback (``LoggedQuery``); its ``args`` are never read."""
        query = record.query
        if query in _ASYNCPG_RESET_QUERIES:
            return  # the pool's own reset on every release (direct route), not an app query
        self.query(query, record.elapsed, record.exception)

    def opened(self, elapsed: float) -> None:
        """A connection was opened in ``elapsed`` seconds."""
        self.inst.opened.inc()
        self.inst.connect_duration.observe(elapsed)

    def connect_failed(self, error: ConnectError) -> None:
        """A connection attempt failed; remembered so a later acquire timeout can name the cause."""
        self.inst.connect_error(error.reason)
        self.last_connect_error = error
        self.last_connect_error_at = time.monotonic()

    def recent_connect_error(self, within: float) -> ConnectError | None:
        """The last connect error, if it happened in the last ``within`` seconds."""
        if self.last_connect_error and time.monotonic() - self.last_connect_error_at <= within:
            return self.last_connect_error
        return None

    def closed(self, reason: str) -> None:
        """A connection was closed; every close after the pool's ``close()`` began counts as ``shutdown``."""
        self.inst.closed("shutdown" if self.closing else reason)

    def exhausted(self, error: PoolTimeout, *, in_use: int, hint: str, waited: float | None = None) -> None:
        """A caller gave up waiting: count it, record its wait, and log ``pool_exhausted``."""
        # The wait of a caller who gave up is a wait too: leaving it out would hide the worst ones from the
        # acquire-duration histogram exactly when the pool is exhausted.
        self.inst.acquire_duration.observe(error.timeout if waited is None else waited)
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
