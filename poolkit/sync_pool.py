"""The sync ``SyncPool`` over psycopg-pool's ConnectionPool, for threaded and WSGI apps."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from psycopg_pool import PoolTimeout as PsycopgPoolTimeout

from poolkit import detect
from poolkit.detect import Mode
from poolkit.errors import ConnectTimeout, PoolClosed, PoolTimeout
from poolkit.metrics import count_routed
from poolkit.observe import Observer
from poolkit.pool import Route, _neutralise_fd, exhaustion_hint, socket_has_data
from poolkit.routing import classify
from poolkit.settings import Settings
from poolkit.state import get_state
from poolkit.translate import translate_connect_error, translate_query_error


class _ObservedCursor(psycopg.Cursor[Any]):
    """psycopg cursor that times each statement for the pool's Observer."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        obs: Observer | None = getattr(self.connection, "poolkit_observer", None)
        if obs is None:
            return super().execute(query, params, **kwargs)
        t0 = time.perf_counter()
        try:
            result = super().execute(query, params, **kwargs)
        except BaseException as exc:
            obs.query(query, time.perf_counter() - t0, exc)
            raise
        obs.query(query, time.perf_counter() - t0, None)
        return result

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        obs: Observer | None = getattr(self.connection, "poolkit_observer", None)
        t0 = time.perf_counter()
        try:
            super().executemany(query, params_seq, **kwargs)
        except BaseException as exc:
            if obs is not None:
                obs.query(query, time.perf_counter() - t0, exc)
            raise
        if obs is not None:
            obs.query(query, time.perf_counter() - t0, None)


class _PoolkitConnection(psycopg.Connection[Any]):
    """psycopg connection bound to one pool's Observer (set on a per-pool subclass)."""

    poolkit_observer: Observer | None = None
    poolkit_pool: SyncPool | None = None

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        obs, owner = cls.poolkit_observer, cls.poolkit_pool
        t0 = time.perf_counter()
        try:
            conn = super().connect(conninfo, **kwargs)
        except Exception as exc:
            if obs is None or owner is None:
                raise
            error = translate_connect_error(exc, owner.dsn, connect_timeout=owner.settings.connect_timeout)
            obs.connect_failed(error)
            raise error from None
        conn._poolkit_opened = time.monotonic()  # type: ignore[attr-defined]
        if obs is not None:
            obs.opened(time.perf_counter() - t0)
        return conn

    def close(self) -> None:
        obs, owner = self.poolkit_observer, self.poolkit_pool
        if obs is not None and owner is not None and not getattr(self, "_poolkit_counted", False):
            self._poolkit_counted = True
            age = time.monotonic() - getattr(self, "_poolkit_opened", time.monotonic())
            if self.broken:
                reason = "error"
            elif age >= owner.settings.max_lifetime:
                reason = "lifetime"
            else:
                reason = "idle"
            obs.closed(reason)
        super().close()


def _check_if_suspect(conn: Any) -> None:
    # See pool._check_if_suspect: a poll instead of a round trip per checkout.
    if conn.closed or socket_has_data(conn.pgconn.socket):
        ConnectionPool.check_connection(conn)


class SyncPool:
    """A thread-safe psycopg pool, configured for where it connects.

    ``with pool.acquire() as conn`` commits on success and rolls back on error, like
    psycopg_pool's ``connection()``.
    """

    def __init__(self, settings: Settings, *, route: Route = "pooled") -> None:
        self.settings = settings
        self.name = settings.name
        self.driver = "psycopg-sync"
        self.route: Route = route
        self.profile = settings.profile
        self.max_size = settings.max_size
        self.dsn, self.detection = detect.pool_target(
            settings.pooled_dsn(), settings.direct_dsn(), route=route, override=settings.pool_mode
        )
        self.mode: Mode = self.detection.mode
        self.tls = detect.tls_config(self.dsn, settings.sslmode, settings.sslrootcert)
        self.observer = Observer(
            self.name,
            self.driver,
            route,
            slow_query_seconds=settings.slow_query_seconds,
            query_log=settings.query_log,
            env=settings.env,
        )
        self.waiting = 0
        self.in_use = 0
        self._lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(self.max_size)
        self._pool: ConnectionPool[Any] | None = None
        self._closed = False
        self._pid = os.getpid()
        self._direct: SyncPool | None = None
        get_state().live_pools.add(self)

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs = detect.psycopg_connect_kwargs(
            self.dsn,
            self.mode,
            self.tls,
            application_name=self.settings.application_name,
            connect_timeout=self.settings.connect_timeout,
        )
        kwargs["cursor_factory"] = _ObservedCursor
        return kwargs

    def _driver_pool(self) -> ConnectionPool[Any]:
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed: create a new one (or call poolkit.get_sync_pool())")
        if self._pid != os.getpid():
            self._forget_after_fork()
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                cls = type(
                    "PoolkitConnection",
                    (_PoolkitConnection,),
                    {"poolkit_observer": self.observer, "poolkit_pool": self},
                )
                new: ConnectionPool[Any] = ConnectionPool(
                    conninfo="",
                    kwargs=self._connect_kwargs(),
                    connection_class=cls,
                    min_size=self.settings.min_size,
                    max_size=self.max_size,
                    open=False,
                    name=self.name,
                    timeout=self.settings.acquire_timeout,
                    max_idle=self.settings.idle_timeout,
                    max_lifetime=self.settings.max_lifetime,
                    reconnect_timeout=max(self.settings.connect_timeout * 3, 30.0),
                    check=_check_if_suspect,
                )
                new.open(wait=self.settings.min_size > 0, timeout=self.settings.connect_timeout)
                self._pool = new
            return self._pool

    def _forget_after_fork(self) -> None:
        """In a forked child: never touch the parent's sockets, start afresh lazily."""
        pool = self._pool
        if pool is not None:
            for conn in list(getattr(pool, "_pool", [])) + list(getattr(pool, "_used", set())):
                if not conn.closed:
                    _neutralise_fd(conn.pgconn.socket)
            get_state().inherited.append(pool)
        self._pool = None
        self._lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(self.max_size)
        self.waiting = self.in_use = 0
        self._pid = os.getpid()
        if self._direct is not None:
            self._direct._forget_after_fork()

    def open(self) -> SyncPool:
        """Open one connection to check the settings (fails fast)."""
        with self.acquire():
            pass
        return self

    def acquire(self, *, timeout: float | None = None) -> _SyncAcquire:
        """``with pool.acquire() as conn``: a connection, or PoolTimeout after ``acquire_timeout``."""
        return _SyncAcquire(self, timeout)

    def _get(self, timeout: float | None) -> Any:
        pool = self._driver_pool()
        inst = self.observer.inst
        t0 = time.perf_counter()
        if not self._sem.acquire(blocking=False):
            inst.acquire_waits.inc()
            limit = self.settings.acquire_timeout if timeout is None else timeout
            with self._lock:
                self.waiting += 1
            try:
                got = self._sem.acquire(timeout=limit)
                # Built before the finally: like the async pool, `waiting` still counts this caller.
                timed_out = None if got else self._timeout_error(limit)
            finally:
                with self._lock:
                    self.waiting -= 1
            if timed_out is not None:
                error = timed_out
                self.observer.exhausted(
                    error,
                    in_use=self.in_use,
                    hint=exhaustion_hint(self.max_size, self.profile),
                    waited=time.perf_counter() - t0,
                )
                raise error
        try:
            conn = self._getconn(pool)
        except PsycopgPoolTimeout:
            self._sem.release()
            raise ConnectTimeout(
                f"pool {self.name!r} could not open a connection to {self.dsn.host}:{self.dsn.port} within "
                f"connect_timeout={self.settings.connect_timeout:g}s; check the host and port, or raise "
                "POOLKIT_CONNECT_TIMEOUT",
                reason="timeout",
            ) from None
        except BaseException:
            self._sem.release()
            raise
        with self._lock:
            self.in_use += 1
        inst.acquire_duration.observe(time.perf_counter() - t0)
        return conn

    def _getconn(self, pool: ConnectionPool[Any]) -> Any:
        # psycopg opens connections in its own worker, which logs and retries failures; short waits let
        # the first failure surface at once (a wrong password should not look like a 10 s timeout).
        start = time.monotonic()
        deadline = start + self.settings.connect_timeout + 1.0
        while True:
            try:
                return pool.getconn(timeout=min(0.2, max(deadline - time.monotonic(), 0.01)))
            except PsycopgPoolTimeout:
                error = self.observer.recent_connect_error(within=time.monotonic() - start)
                if error is not None:
                    raise error from None
                if time.monotonic() >= deadline:
                    raise

    def _put(self, conn: Any, exc: BaseException | None) -> None:
        try:
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                if exc is None:
                    conn.commit()
                else:
                    conn.rollback()
            pool = self._pool
            if pool is not None:
                pool.putconn(conn)
        finally:
            with self._lock:
                self.in_use -= 1
            self._sem.release()

    def _timeout_error(self, limit: float) -> PoolTimeout:
        return PoolTimeout(
            f"pool {self.name!r} ({self.route}, {self.driver}) is exhausted: all {self.max_size} connection(s) "
            f"stayed in use for {limit:g}s while {self.waiting} caller(s) waited ({self.in_use} in use). "
            + exhaustion_hint(self.max_size, self.profile),
            pool=self.name,
            max_size=self.max_size,
            waiting=self.waiting,
            timeout=limit,
        )

    def direct(self) -> SyncPool:
        """A pool on the direct URL (migrations, introspection, session features), created on first use."""
        if self.route == "direct":
            return self
        if self._direct is None:
            if self.settings.direct_url is None and self.mode is not Mode.TRANSACTION:
                return self
            self._direct = SyncPool(self.settings, route="direct")
        return self._direct

    def routed(self, sql: str) -> SyncPool:
        """The pool ``sql`` should run on: :meth:`direct` when ``poolkit.routing.classify`` says so, else this one.

        ``pool.routed(sql).execute(sql, *args)``: DDL, catalog reads and session features (``SET``,
        ``LISTEN``, advisory locks, ...) go to the direct URL, everything else stays pooled. Each call is
        counted in ``poolkit_routed_statements_total{route,reason}``. Raises ConfigError when ``sql`` needs
        the direct connection and only a transaction pooler is configured.
        """
        decision = classify(sql)
        target = self.direct() if decision.direct else self
        count_routed(self.name, self.driver, decision.route.value, decision.reason)
        return target

    def as_user(self, claims: Any, *, role: str | None = "authenticated") -> Any:
        """``with pool.as_user(claims) as conn``: a transaction under RLS claims and role (poolkit.rls)."""
        from poolkit.rls import as_user_sync  # noqa: PLC0415 - poolkit.rls refers back to this module

        return as_user_sync(self, claims, role=role)

    def execute(self, query: Any, *args: Any) -> str:
        """Run a statement; return its status tag."""
        with self.acquire() as conn:
            try:
                return str(conn.execute(query, args or None).statusmessage or "")
            except Exception as exc:
                raise (translate_query_error(exc, self.mode, pool=self.name) or exc) from exc

    def fetch(self, query: Any, *args: Any) -> list[Any]:
        """All rows, as tuples."""
        with self.acquire() as conn:
            try:
                return list(conn.execute(query, args or None).fetchall())
            except Exception as exc:
                raise (translate_query_error(exc, self.mode, pool=self.name) or exc) from exc

    def fetchval(self, query: Any, *args: Any) -> Any:
        """The first column of the first row, or None."""
        rows = self.fetch(query, *args)
        return rows[0][0] if rows else None

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` for connections in use, then close every connection."""
        self._closed = True
        self.observer.closing = True
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.close(timeout=timeout)
        if self._direct is not None:
            self._direct.close(timeout)
        get_state().live_pools.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def metric_labels(self) -> tuple[str, str, str]:
        return self.observer.inst.labels

    def gauge_values(self) -> tuple[int, int, int, int, int]:
        pool = self._pool
        idle = pool.get_stats().get("pool_available", 0) if pool is not None and self._pid == os.getpid() else 0
        return self.in_use, idle, self.max_size, self.settings.min_size, self.waiting

    def stats(self) -> dict[str, Any]:
        """A snapshot: sizes, connections in use / idle, callers waiting, detected mode."""
        in_use, idle, max_size, min_size, waiting = self.gauge_values()
        return {
            "name": self.name,
            "driver": self.driver,
            "route": self.route,
            "mode": self.mode.value,
            "max_size": max_size,
            "min_size": min_size,
            "in_use": in_use,
            "idle": idle,
            "waiting": waiting,
            "closed": self._closed,
        }

    def __repr__(self) -> str:
        if self._closed:
            return f"<SyncPool {self.name} {self.route} {self.driver} closed>"
        in_use, idle, max_size, _, waiting = self.gauge_values()
        return (
            f"<SyncPool {self.name} {self.route} {self.driver} mode={self.mode.value} max={max_size} "
            f"in_use={in_use} idle={idle} waiting={waiting}>"
        )


class _SyncAcquire:
    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: SyncPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: Any = None

    def __enter__(self) -> Any:
        self._conn = self._pool._get(self._timeout)
        return self._conn

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._put(conn, exc)


def create_sync_pool(*, open: bool = True, settings: Settings | None = None, **overrides: Any) -> SyncPool:
    """Create a sync psycopg pool from the environment plus keyword overrides, and check it can connect."""
    from poolkit.settings import load_settings  # noqa: PLC0415

    overrides.setdefault("driver", "psycopg")
    cfg = settings if settings is not None and list(overrides) == ["driver"] else load_settings(**overrides)
    pool = SyncPool(cfg)
    if open:
        try:
            pool.open()
        except BaseException:
            pool.close(timeout=1.0)
            raise
    return pool
