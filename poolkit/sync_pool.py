"""The sync ``SyncPool`` over psycopg-pool's ConnectionPool, for threaded and WSGI apps."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool
from psycopg_pool import PoolTimeout as PsycopgPoolTimeout

from poolkit.errors import ConnectTimeout, PoolClosed
from poolkit.observe import Observer, Recorder
from poolkit.pool import _neutralise_fd, _sql, socket_has_data
from poolkit.pool_base import ConnectionHooks, PoolBase, Route, SessionGuard, psycopg_pool_options
from poolkit.settings import Settings
from poolkit.state import get_state
from poolkit.translate import fresh_copy, translate_connect_error, translate_query_error


class _ObservedCursor(psycopg.Cursor[Any]):
    """psycopg cursor that screens and times each statement for the pool's Recorder."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        conn: Any = self._conn
        rec: Recorder | None = conn._poolkit_rec
        if rec is None or query == "":  # "" is psycopg_pool's check_connection ping: the pool's, not the app's
            return super().execute(query, params, **kwargs)
        guard: SessionGuard = conn._poolkit_guard
        if (type(query) is not str or query not in guard.clean) and guard.dirty(query, _sql(query, conn)):
            conn._poolkit_dirty = True
        t0 = time.perf_counter()
        try:
            result = super().execute(query, params, **kwargs)
        except BaseException as exc:
            rec.query(query, time.perf_counter() - t0, exc)
            raise
        rec.query(query, time.perf_counter() - t0, None)
        return result

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        conn: Any = self._conn
        rec: Recorder | None = conn._poolkit_rec
        if rec is None:
            super().executemany(query, params_seq, **kwargs)
            return
        guard: SessionGuard = conn._poolkit_guard
        if (type(query) is not str or query not in guard.clean) and guard.dirty(query, _sql(query, conn)):
            conn._poolkit_dirty = True
        t0 = time.perf_counter()
        try:
            super().executemany(query, params_seq, **kwargs)
        except BaseException as exc:
            rec.query(query, time.perf_counter() - t0, exc)
            raise
        rec.query(query, time.perf_counter() - t0, None)


class _PoolkitConnection(psycopg.Connection[Any]):
    """psycopg connection bound to one pool's Observer, Recorder and guard (set on a per-pool subclass)."""

    poolkit_observer: Observer | None = None
    poolkit_pool: SyncPool | None = None
    _poolkit_rec: Recorder | None = None
    _poolkit_guard: SessionGuard | None = None
    _poolkit_dirty = False

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

    def poolkit_lost(self) -> None:
        """Count this connection closed by ``error`` once: psycopg_pool drops a broken one without close()."""
        obs = self.poolkit_observer
        if obs is not None and not getattr(self, "_poolkit_counted", False):
            self._poolkit_counted = True
            obs.closed("error")


def _check_if_suspect(conn: Any) -> None:
    # See pool._check_if_suspect: a poll instead of a round trip per checkout.
    if conn.closed or socket_has_data(conn.pgconn.socket):
        try:
            ConnectionPool.check_connection(conn)
        except Exception:
            conn.poolkit_lost()
            raise


def _reset(conn: Any) -> None:
    # See pool._reset_psycopg: DISCARD ALL after a statement the session guard flagged.
    conn._poolkit_dirty = False
    try:
        autocommit = conn.autocommit
        conn.autocommit = True
        psycopg.Cursor(conn).execute("DISCARD ALL")
        conn.autocommit = autocommit
    except Exception:
        conn.close()


class SyncPool(PoolBase):
    """A thread-safe psycopg pool, configured for where it connects.

    ``with pool.acquire() as conn`` commits on success and rolls back on error, like
    psycopg_pool's ``connection()``.
    """

    def __init__(self, settings: Settings, *, route: Route = "pooled", hooks: ConnectionHooks | None = None) -> None:
        self.in_use = 0
        self._pool: ConnectionPool[Any] | None = None
        self._pid = os.getpid()
        super().__init__(settings, route=route, driver="psycopg-sync", hooks=hooks)
        self._lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(self.max_size)
        # One Tally for every thread: written under self._lock (acquire path) or the recorder's lock (queries).
        self._recorder = self.observer.recorder(locked=True)
        self._tally = self._recorder.tally

    def _connect_kwargs(self) -> dict[str, Any]:
        return self._psycopg_kwargs(_ObservedCursor)

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
                    {
                        "poolkit_observer": self.observer,
                        "poolkit_pool": self,
                        "_poolkit_rec": self._recorder,
                        "_poolkit_guard": self.guard,
                    },
                )
                new: ConnectionPool[Any] = ConnectionPool(
                    kwargs=self._connect_kwargs(),
                    connection_class=cls,
                    check=_check_if_suspect,
                    **psycopg_pool_options(self.settings, max_size=self.max_size, name=self.name, hooks=self.hooks),
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
        # The parent's counts were copied into this process: keep them, and write to a fresh Tally from here.
        self.observer.retire(self._recorder)
        self._recorder = self.observer.recorder(locked=True)
        self._tally = self._recorder.tally
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

    def connection(self, timeout: float | None = None) -> _SyncAcquire:
        """``with pool.connection() as conn``: psycopg_pool's name for :meth:`acquire`, same behaviour."""
        return _SyncAcquire(self, timeout)

    def _get(self, timeout: float | None) -> Any:
        pool = self._driver_pool()
        t0 = time.perf_counter()
        if not self._sem.acquire(blocking=False):
            limit = self.settings.acquire_timeout if timeout is None else timeout
            with self._lock:
                if self.max_waiting and self.waiting >= self.max_waiting:
                    refused = self.too_many_waiting()
                else:
                    refused = None
                    self.waiting += 1
                    self._tally.waited()
            if refused is not None:
                raise refused
            timed_out = None
            try:
                got = self._sem.acquire(timeout=limit)
                # Built before the finally: like the async pool, `waiting` still counts this caller.
                timed_out = None if got else self.exhausted(limit)
            finally:
                with self._lock:
                    self.waiting -= 1
                    if timed_out is not None:
                        self._tally.acquired(time.perf_counter() - t0)
            if timed_out is not None:
                raise timed_out
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
            self._tally.acquired(time.perf_counter() - t0)
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
                pass
            # Outside the except block: the error must not carry psycopg_pool's PoolTimeout as its context.
            error = self.observer.recent_connect_error(within=time.monotonic() - start)
            if error is not None:
                raise fresh_copy(error)
            if time.monotonic() >= deadline:
                raise PsycopgPoolTimeout(f"no connection within {self.settings.connect_timeout:g}s")

    def _put(self, conn: Any, exc: BaseException | None) -> None:
        try:
            try:
                if not conn.closed:
                    if conn.pgconn.transaction_status != TransactionStatus.IDLE:
                        if exc is None:
                            conn.commit()
                        else:
                            conn.rollback()
                    if conn._poolkit_dirty:
                        _reset(conn)
            finally:
                # See Pool: a connection is always given back, even when COMMIT failed.
                if conn.pgconn.transaction_status == TransactionStatus.UNKNOWN:
                    conn.poolkit_lost()
                pool = self._pool
                if pool is not None:
                    pool.putconn(conn)
        finally:
            with self._lock:
                self.in_use -= 1
            self._sem.release()

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
        self.observer.retire(self._recorder)
        if self._direct is not None:
            self._direct.close(timeout)
        get_state().live_pools.discard(self)

    def gauge_values(self) -> tuple[int, int, int, int, int]:
        pool = self._pool
        idle = pool.get_stats().get("pool_available", 0) if pool is not None and self._pid == os.getpid() else 0
        return self.in_use, idle, self.max_size, self.settings.min_size, self.waiting


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


def create_sync_pool(
    *,
    open: bool = True,
    settings: Settings | None = None,
    configure: Callable[[Any], Any] | None = None,
    reset: Callable[[Any], Any] | None = None,
    **overrides: Any,
) -> SyncPool:
    """Create a sync psycopg pool from the environment plus keyword overrides, and check it can connect.

    ``configure`` (once per new connection) and ``reset`` (when a connection comes back, after poolkit's
    own clean-up) are psycopg_pool's hooks: plain functions that take the connection.
    """
    from poolkit.settings import load_settings  # noqa: PLC0415

    overrides.setdefault("driver", "psycopg")
    cfg = settings if settings is not None and list(overrides) == ["driver"] else load_settings(**overrides)
    hooks = ConnectionHooks.for_driver("psycopg", asynchronous=False, configure=configure, reset=reset)
    pool = SyncPool(cfg, hooks=hooks)
    if open:
        try:
            pool.open()
        except BaseException:
            pool.close(timeout=1.0)
            raise
    return pool
