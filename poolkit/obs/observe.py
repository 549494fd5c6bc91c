"""Per-pool instrumentation: metrics, the ``slow_query`` / ``pool_exhausted`` events, the dev query log."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from typing import Any

from poolkit.core.translate import sqlstate_of
from poolkit.errors import ConnectError, PoolTimeout
from poolkit.obs.log import enable_query_log, get_logger, is_development
from poolkit.obs.metrics import QUERY_BUCKETS, PoolInstruments, Tally


def _sql_text(query: Any) -> str:
    if isinstance(query, str):
        return query
    if isinstance(query, bytes):
        return query.decode("utf-8", "replace")
    return type(query).__name__  # psycopg sql.Composed: rendering it needs a connection; the type is enough


class Recorder:
    """The per-statement path of one pool on one thread: timings into a Tally, anything rare to the Observer.

    An async pool has one per event loop (its binding), so the Tally has a single writer and no lock.
    """

    __slots__ = ("buckets", "obs", "slow", "tally", "verbose")

    def __init__(self, obs: Observer, tally: Tally) -> None:
        self.obs = obs
        self.tally = tally
        # Tally.query inline (one call less per statement), unless the tally writes elsewhere (multiprocess).
        self.buckets = tally.query_buckets if type(tally) is Tally else None
        self.slow = obs.slow
        self.verbose = obs.query_log

    def query(self, query: Any, elapsed: float, exc: BaseException | None) -> None:
        """Record one statement; called by the driver hooks after it finished. Parameters are never passed."""
        buckets = self.buckets
        if buckets is not None:
            buckets[bisect_left(QUERY_BUCKETS, elapsed)] += 1
            self.tally.query_sum += elapsed
        else:
            self.tally.query(elapsed)
        if exc is not None or elapsed >= self.slow or self.verbose:
            self.obs.query_event(query, elapsed, exc)


class LockedRecorder(Recorder):
    """A Recorder shared by threads (the sync pool): the Tally is written under a lock."""

    __slots__ = ("lock",)

    def __init__(self, obs: Observer, tally: Tally) -> None:
        super().__init__(obs, tally)
        self.lock = threading.Lock()

    def query(self, query: Any, elapsed: float, exc: BaseException | None) -> None:
        with self.lock:
            self.tally.query(elapsed)
        if exc is not None or elapsed >= self.slow or self.verbose:
            self.obs.query_event(query, elapsed, exc)


def normalized(query: Any) -> str:
    """SQL for a log line: literals replaced, length capped, never parameters."""
    from poolkit.sql.normalize import normalize  # noqa: PLC0415 - only needed for the rare slow/logged query

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

    def recorder(self, *, locked: bool = False) -> Recorder:
        """A new Recorder with its own Tally, for one writer thread (``locked`` when threads share it)."""
        tally = self.inst.new_tally()
        return LockedRecorder(self, tally) if locked else Recorder(self, tally)

    def retire(self, recorder: Recorder) -> None:
        """The recorder's writer is gone (loop ended, pool closed, forked child): keep its counts."""
        self.inst.retire(recorder.tally)

    def query_event(self, query: Any, elapsed: float, exc: BaseException | None) -> None:
        """A statement that failed, was slow, or is logged in development: count and log it."""
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

    def exhausted(self, error: PoolTimeout, *, in_use: int, hint: str) -> None:
        """A caller gave up waiting: count it and log ``pool_exhausted`` (the pool records the wait itself)."""
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
