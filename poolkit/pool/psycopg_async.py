"""psycopg for poolkit's pools: instrumented cursor and connection, checkout check, reset, hand-out and hand-back.

``psycopg_async.py`` is the source and ``psycopg_sync.py`` is generated from it by ``scripts/async_to_sync``
(unasync: ``async``/``await`` dropped, ``Async*`` names replaced), so the async ``Pool``'s psycopg driver and
the sync ``SyncPool`` cannot drift apart. Only code that reads the same without ``async`` belongs here; what
differs (waiting for a slot: asyncio or threads) stays in ``driver_psycopg`` and ``sync_pool``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from time import monotonic, perf_counter
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool
from psycopg_pool import PoolTimeout as PsycopgPoolTimeout

from poolkit.core.dsn import Dsn
from poolkit.core.translate import fresh_copy, translate_connect_error
from poolkit.errors import ConnectTimeout
from poolkit.obs.observe import Observer, Recorder
from poolkit.pool.base import PoolBase, SessionGuard, psycopg_pool_options, socket_has_data, sql_text
from poolkit.pool.driver import ISOLATION_SQL

_IDLE = TransactionStatus.IDLE
_UNKNOWN = TransactionStatus.UNKNOWN  # libpq's status of a broken connection
_DOLLAR_PARAMETER = re.compile(r"\$\d+")


class ObservedAsyncCursor(psycopg.AsyncCursor[Any]):
    """psycopg cursor that screens and times each statement for the pool's Recorder."""

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        conn: Any = self._conn
        rec: Recorder | None = conn._poolkit_rec
        if rec is None or query == "":  # "" is psycopg_pool's check_connection ping: the pool's, not the app's
            return await super().execute(query, params, **kwargs)
        guard: SessionGuard = conn._poolkit_guard
        if (type(query) is not str or query not in guard.clean) and guard.dirty(query, sql_text(query, conn)):
            conn._poolkit_dirty = True
        t0 = perf_counter()
        try:
            result = await super().execute(query, params, **kwargs)
        except BaseException as exc:
            rec.query(query, perf_counter() - t0, exc)
            raise
        rec.query(query, perf_counter() - t0, None)
        return result

    async def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        conn: Any = self._conn
        rec: Recorder | None = conn._poolkit_rec
        if rec is None:
            await super().executemany(query, params_seq, **kwargs)
            return
        guard: SessionGuard = conn._poolkit_guard
        if (type(query) is not str or query not in guard.clean) and guard.dirty(query, sql_text(query, conn)):
            conn._poolkit_dirty = True
        t0 = perf_counter()
        try:
            await super().executemany(query, params_seq, **kwargs)
        except BaseException as exc:
            rec.query(query, perf_counter() - t0, exc)
            raise
        rec.query(query, perf_counter() - t0, None)


class PoolkitAsyncConnection(psycopg.AsyncConnection[Any]):
    """psycopg connection bound to one pool's Observer and guard (set on a per-pool subclass).

    ``_poolkit_rec`` is the Recorder of the statements: per connection for the async pool (each event loop's
    binding has its own), on the class for the sync pool (one for every thread).
    """

    poolkit_observer: Observer | None = None
    poolkit_dsn: Dsn | None = None
    poolkit_connect_timeout: float = 10.0
    poolkit_max_lifetime: float = 0.0
    _poolkit_guard: SessionGuard | None = None
    _poolkit_rec: Recorder | None = None
    _poolkit_dirty = False

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        obs = cls.poolkit_observer
        t0 = perf_counter()
        try:
            conn = await super().connect(conninfo, **kwargs)
        except Exception as exc:
            if obs is None or cls.poolkit_dsn is None:
                raise
            error = translate_connect_error(exc, cls.poolkit_dsn, connect_timeout=cls.poolkit_connect_timeout)
            obs.connect_failed(error)
            raise error from None
        conn._poolkit_opened = monotonic()  # type: ignore[attr-defined]
        if obs is not None:
            obs.opened(perf_counter() - t0)
        return conn

    async def close(self) -> None:
        obs = self.poolkit_observer
        if obs is not None and not getattr(self, "_poolkit_counted", False):
            self._poolkit_counted = True
            age = monotonic() - getattr(self, "_poolkit_opened", monotonic())
            if self.broken:
                reason = "error"
            elif self.poolkit_max_lifetime and age >= self.poolkit_max_lifetime:
                reason = "lifetime"
            else:
                reason = "idle"
            obs.closed(reason)
        await super().close()

    def poolkit_lost(self) -> None:
        """Count this connection closed by ``error`` once: psycopg_pool drops a broken one without close()."""
        obs = self.poolkit_observer
        if obs is not None and not getattr(self, "_poolkit_counted", False):
            self._poolkit_counted = True
            obs.closed("error")


def connection_class(owner: PoolBase, recorder: Recorder | None) -> type[PoolkitAsyncConnection]:
    """The connection class of one pool: its Observer, target and guard (and ``recorder``, if one for all)."""
    return type(
        "PoolkitAsyncConnection",
        (PoolkitAsyncConnection,),
        {
            "poolkit_observer": owner.observer,
            "poolkit_dsn": owner.dsn,
            "poolkit_connect_timeout": owner.settings.connect_timeout,
            "poolkit_max_lifetime": owner.settings.max_lifetime,
            "_poolkit_guard": owner.guard,
            "_poolkit_rec": recorder,
        },
    )


async def check_if_suspect(conn: Any) -> None:
    """psycopg_pool's ``check=``: a round trip only when the idle connection's socket is readable.

    An idle connection has nothing to say; a readable socket means the server closed or is closing it. That
    costs a poll instead of psycopg_pool's check round trip on every checkout (which measured at 0.7x of the
    raw pool's throughput), and a broken connection still never reaches the caller.
    """
    if conn.closed or socket_has_data(conn.pgconn.socket):
        try:
            await AsyncConnectionPool.check_connection(conn)
        except Exception:
            conn.poolkit_lost()
            raise


async def reset_session(conn: Any) -> None:
    """DISCARD ALL, after a statement the session guard flagged; a connection that cannot be reset is closed.

    psycopg_pool resets nothing by default, so session state passes to the next borrower. DISCARD ALL (one
    round trip) clears all of it; psycopg sees the command tag and drops its own prepared-statement cache with
    it. Done here rather than through psycopg_pool's ``reset=``, which returns every connection through a
    worker task (a hop per release). The pool replaces a closed connection.
    """
    conn._poolkit_dirty = False
    try:
        autocommit = conn.autocommit
        await conn.set_autocommit(True)
        await psycopg.AsyncCursor(conn).execute("DISCARD ALL")
        await conn.set_autocommit(autocommit)
    except Exception:
        await conn.close()


async def open_pool(
    owner: PoolBase, connection_class: type[PoolkitAsyncConnection], configure: Callable[[Any], Any] | None
) -> AsyncConnectionPool[Any]:
    """The psycopg_pool pool of ``owner``, opened (waiting for connections only when ``min_size`` asks).

    ``configure`` replaces the app's hook (which then runs inside it); None keeps the app's.
    """
    options = psycopg_pool_options(owner.settings, max_size=owner.max_size, name=owner.name, hooks=owner.hooks)
    if configure is not None:
        options["configure"] = configure
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        kwargs=owner.psycopg_kwargs(ObservedAsyncCursor),
        connection_class=connection_class,
        check=check_if_suspect,
        **options,
    )
    await pool.open(wait=owner.settings.min_size > 0, timeout=owner.settings.connect_timeout)
    return pool


async def getconn(pool: AsyncConnectionPool[Any], owner: PoolBase, spent: float) -> Any:
    """A connection from ``pool`` for a caller that holds a slot (and has waited ``spent`` seconds for it).

    psycopg only waits here while it opens a connection, in its own worker, which logs and retries failures.
    Short waits let the first failure surface at once (a wrong password should not look like a 10 s timeout).
    """
    start = monotonic() - spent
    settings = owner.settings
    deadline = start + settings.connect_timeout + 1.0
    while True:
        try:
            return await pool.getconn(timeout=min(0.2, max(deadline - monotonic(), 0.01)))
        except PsycopgPoolTimeout:
            pass
        # Outside the except block: the error must not carry psycopg_pool's PoolTimeout as its context.
        error = owner.observer.recent_connect_error(within=monotonic() - start)
        if error is not None:
            raise fresh_copy(error)
        if monotonic() >= deadline:
            raise ConnectTimeout(
                f"pool {owner.name!r} could not open a connection to {owner.dsn.host}:{owner.dsn.port} within "
                f"connect_timeout={settings.connect_timeout:g}s; check the host and port, or raise "
                "POOLKIT_CONNECT_TIMEOUT",
                reason="timeout",
            )


async def give_back(pool: AsyncConnectionPool[Any] | None, conn: Any, exc: BaseException | None) -> None:
    """End ``conn``'s transaction as psycopg_pool's ``connection()`` does, reset it if dirty, put it back."""
    try:
        if not conn.closed:
            if conn.pgconn.transaction_status != _IDLE:
                # The psycopg_pool.connection() contract: commit on success, roll back on error.
                if exc is None:
                    await conn.commit()
                else:
                    await conn.rollback()
            if conn._poolkit_dirty:
                await reset_session(conn)
    finally:
        # Even when COMMIT failed (the server went away): psycopg_pool replaces a broken connection, and one
        # never given back would be a slot lost for good.
        if conn.pgconn.transaction_status == _UNKNOWN:
            conn.poolkit_lost()
        if pool is not None:
            await pool.putconn(conn)


def open_connections(pool: AsyncConnectionPool[Any] | None) -> list[Any]:
    """Every open connection of ``pool``, idle or in use (for the fork guard)."""
    if pool is None:
        return []
    conns = list(getattr(pool, "_pool", [])) + list(getattr(pool, "_used", set()))
    return [conn for conn in conns if not conn.closed]


def idle_and_size(pool: AsyncConnectionPool[Any] | None) -> tuple[int, int]:
    """(idle connections, open connections) of ``pool``."""
    if pool is None:
        return 0, 0
    stats = pool.get_stats()
    return stats.get("pool_available", 0), stats.get("pool_size", 0)


# -- the query shortcuts' driver methods (poolkit.pool.driver.AsyncDriver) -----------------------------------------


def sql(text: str) -> str:
    """poolkit's own ``$n`` statement in psycopg's ``%s`` style (parameters are numbered in argument order)."""
    return _DOLLAR_PARAMETER.sub("%s", text)


async def execute(conn: Any, query: Any, args: Sequence[Any], timeout: float | None = None) -> str:
    """Run a statement; its status tag. psycopg has no per-statement timeout argument: ``timeout`` is unused."""
    cur = await conn.execute(query, args or None)
    return str(cur.statusmessage or "")


async def fetch(conn: Any, query: Any, args: Sequence[Any]) -> list[Any]:
    cur = await conn.execute(query, args or None)
    return list(await cur.fetchall())


async def fetchrow(conn: Any, query: Any, args: Sequence[Any]) -> Any:
    cur = await conn.execute(query, args or None)
    return await cur.fetchone()


async def fetchval(conn: Any, query: Any, args: Sequence[Any]) -> Any:
    cur = await conn.execute(query, args or None)
    row = await cur.fetchone()
    return None if row is None else row[0]


class Transaction:
    """A transaction on a psycopg connection outside autocommit: psycopg sends BEGIN before the first statement."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def commit(self) -> None:
        await self.conn.commit()

    async def rollback(self) -> None:
        await self.conn.rollback()


async def begin(conn: Any, isolation: str | None = None) -> Transaction:
    """Begin a transaction on ``conn``; ``isolation`` (``read_committed``, ...) is its first statement."""
    if isolation is not None:
        # SET TRANSACTION must be the transaction's first statement: it is, psycopg sends BEGIN before it.
        await conn.execute(f"SET TRANSACTION ISOLATION LEVEL {ISOLATION_SQL[isolation]}")
    return Transaction(conn)
