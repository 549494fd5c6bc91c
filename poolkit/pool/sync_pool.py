"""The sync ``SyncPool`` over psycopg-pool's ConnectionPool, for threaded and WSGI apps.

The psycopg code it shares with the async pool (instrumented cursor and connection, checkout check, reset,
hand-back, shortcuts) is generated from the async source (``psycopg_sync``, ``shortcuts_sync``); this module
keeps what threads do differently: one driver pool per process, a semaphore with a timeout, a lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from psycopg_pool import ConnectionPool

from poolkit.core.settings import Settings, load_settings
from poolkit.core.state import get_state
from poolkit.errors import PoolClosed
from poolkit.pool import psycopg_sync
from poolkit.pool.base import ConnectionHooks, PoolBase, Route, neutralise_fd
from poolkit.pool.rls_sync import SyncSessionDriver, SyncUserSession
from poolkit.pool.shortcuts_sync import SyncQueries, SyncShortcuts


class _SyncAdapter(SyncQueries, SyncSessionDriver, Protocol):
    """The driver side of the sync pool's shortcuts and RLS sessions: ``poolkit.pool.psycopg_sync``."""


class SyncPool(SyncShortcuts, PoolBase):
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
        #: The shortcuts' driver methods (generated from the async pool's psycopg ones).
        self.adapter: _SyncAdapter = psycopg_sync

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
                cls = psycopg_sync.connection_class(self, self._recorder)
                self._pool = psycopg_sync.open_pool(self, cls, None)
            return self._pool

    def _forget_after_fork(self) -> None:
        """In a forked child: never touch the parent's sockets, start afresh lazily."""
        pool = self._pool
        if pool is not None:
            for conn in psycopg_sync.open_connections(pool):
                neutralise_fd(conn.pgconn.socket)
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
            conn = psycopg_sync.getconn(pool, self, time.perf_counter() - t0)
        except BaseException:
            self._sem.release()
            raise
        with self._lock:
            self.in_use += 1
            self._tally.acquired(time.perf_counter() - t0)
        return conn

    def _put(self, conn: Any, exc: BaseException | None) -> None:
        try:
            psycopg_sync.give_back(self._pool, conn, exc)
        finally:
            with self._lock:
                self.in_use -= 1
            self._sem.release()

    def as_user(self, claims: Any, *, role: str | None = "authenticated") -> SyncUserSession:
        """``with pool.as_user(claims) as conn``: a transaction under RLS claims and role (poolkit.rls)."""
        return SyncUserSession(self, claims, role)

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

    def retire(self) -> None:
        """Close this pool for a registry that replaces it, in a thread: callers in flight finish first."""
        threading.Thread(target=self.close, name=f"poolkit-retire-{self.name}", daemon=True).start()

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
