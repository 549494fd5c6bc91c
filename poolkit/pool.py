"""The async ``Pool``: one wrapper over asyncpg and psycopg-pool that is loop-, fork- and reload-safe."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import select
from asyncio import get_running_loop
from collections import deque
from collections.abc import AsyncGenerator, Callable, Coroutine
from time import monotonic, perf_counter
from typing import Any

import asyncpg
import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool
from psycopg_pool import PoolTimeout as PsycopgPoolTimeout

from poolkit import detect
from poolkit.detect import Mode
from poolkit.dsn import Dsn
from poolkit.errors import ConnectError, ConnectTimeout, PoolClosed
from poolkit.observe import Observer, Recorder
from poolkit.pool_base import ConnectionHooks, PoolBase, Route, SessionGuard, psycopg_pool_options
from poolkit.settings import Settings
from poolkit.state import get_state
from poolkit.translate import fresh_copy, translate_connect_error, translate_query_error

_IDLE = TransactionStatus.IDLE
_UNKNOWN = TransactionStatus.UNKNOWN  # libpq's status of a broken connection


def _timed(method: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Wrap an asyncpg query method: screen the SQL for session state, time the call for the Recorder."""

    @functools.wraps(method)
    async def timed(self: PoolkitAsyncpgConnection, query: str, *args: Any, **kwargs: Any) -> Any:
        rec = self._poolkit_rec
        if rec is None:
            return await method(self, query, *args, **kwargs)
        guard = self._poolkit_guard
        if query not in guard.clean and guard.dirty(query, query):
            self._poolkit_dirty = True
        t0 = perf_counter()
        try:
            result = await method(self, query, *args, **kwargs)
        except BaseException as exc:
            rec.query(query, perf_counter() - t0, exc)
            raise
        rec.query(query, perf_counter() - t0, None)
        return result

    return timed


class PoolkitAsyncpgConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg connection that screens and times the app's statements and remembers its open/close story.

    The query methods are wrapped here rather than observed with ``add_query_logger``: asyncpg builds a
    record and schedules a callback per logged query, which measured at ~15 % of a SELECT 1's throughput; a
    wrapper costs two clock reads. asyncpg's own methods call its private ``_execute``, so nothing is
    counted twice.
    """

    __slots__ = (
        "_poolkit_close_reason",
        "_poolkit_dirty",
        "_poolkit_guard",
        "_poolkit_idle_since",
        "_poolkit_opened",
        "_poolkit_poll",
        "_poolkit_rec",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._poolkit_opened = monotonic()
        self._poolkit_close_reason: str | None = None
        self._poolkit_idle_since: float | None = monotonic()
        self._poolkit_rec: Recorder | None = None
        self._poolkit_guard: Any = None  # the pool's SessionGuard, set with _poolkit_rec
        self._poolkit_dirty = False
        self._poolkit_poll: Any = None

    execute = _timed(asyncpg.Connection.execute)
    executemany = _timed(asyncpg.Connection.executemany)
    fetch = _timed(asyncpg.Connection.fetch)
    fetchrow = _timed(asyncpg.Connection.fetchrow)
    fetchval = _timed(asyncpg.Connection.fetchval)


def _sql(query: Any, conn: Any) -> str:
    if type(query) is str:
        return query
    if isinstance(query, bytes):
        return query.decode("utf-8", "replace")
    return str(query.as_string(conn))  # a psycopg sql.Composable


class _ObservedAsyncCursor(psycopg.AsyncCursor[Any]):
    """psycopg cursor that screens and times each statement for the pool's Recorder."""

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        conn: Any = self._conn
        rec: Recorder | None = conn._poolkit_rec
        if rec is None or query == "":  # "" is psycopg_pool's check_connection ping: the pool's, not the app's
            return await super().execute(query, params, **kwargs)
        guard: SessionGuard = conn._poolkit_guard
        if (type(query) is not str or query not in guard.clean) and guard.dirty(query, _sql(query, conn)):
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
        if (type(query) is not str or query not in guard.clean) and guard.dirty(query, _sql(query, conn)):
            conn._poolkit_dirty = True
        t0 = perf_counter()
        try:
            await super().executemany(query, params_seq, **kwargs)
        except BaseException as exc:
            rec.query(query, perf_counter() - t0, exc)
            raise
        rec.query(query, perf_counter() - t0, None)


class _PoolkitAsyncConnection(psycopg.AsyncConnection[Any]):
    """psycopg connection bound to one pool's Observer and guard (set on a per-pool subclass).

    ``_poolkit_rec`` is set per connection by the binding that opened it (its event loop's Recorder).
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


class _Waiter:
    """A caller waiting for a connection, as _Deadlines sees it (``_Acquire`` has the same four slots)."""

    __slots__ = ("cancelling", "deadline", "expired", "task")

    def __init__(self, task: asyncio.Task[Any] | None, deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.cancelling = task.cancelling() if task is not None else 0
        self.expired = False


class _Deadlines:
    """The acquire timeouts of one binding's waiters, served by one loop timer.

    ``asyncio.timeout()`` per waiter schedules and cancels a timer handle on every acquisition that has to
    wait, which on a busy pool (every acquisition waits) was the largest part of the wrapper's cost. Here
    waiters queue in arrival order, served ones leave from the front, and a single timer is armed for the
    earliest deadline; when it fires, waiters past their deadline are cancelled (and turn that into
    PoolTimeout, the way ``asyncio.timeout`` turns it into TimeoutError). A finished waiter sets its
    ``task`` to None and calls :meth:`done`.
    """

    __slots__ = ("armed", "loop", "queue", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: deque[Any] = deque()  # _Waiter or _Acquire
        self.timer: asyncio.TimerHandle | None = None
        self.armed = math.inf

    def add(self, timeout: float) -> _Waiter:
        waiter = _Waiter(asyncio.current_task(self.loop), self.loop.time() + timeout)
        self.queue.append(waiter)
        if waiter.deadline < self.armed:
            self.arm(waiter.deadline)
        return waiter

    def done(self) -> None:
        queue = self.queue
        while queue and queue[0].task is None:
            queue.popleft()

    def arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._fire)
        self.armed = when

    def _fire(self) -> None:
        self.timer = None
        self.armed = math.inf
        now = self.loop.time()
        upcoming = math.inf
        for waiter in self.queue:
            task = waiter.task
            if task is None or waiter.expired:
                continue
            if waiter.deadline <= now:
                waiter.expired = True
                task.cancel()
            elif waiter.deadline < upcoming:
                upcoming = waiter.deadline
        if upcoming < math.inf:
            self.arm(upcoming)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _poller(fd: int) -> Any:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller


class _Binding:
    """A pool's driver pool on one event loop: asyncio objects belong to the loop that made them."""

    def __init__(self, owner: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.max_size = owner.max_size
        self.sem = asyncio.Semaphore(owner.max_size)
        self.in_use = 0
        self.claimed = 0  # asyncpg: callers holding or about to get a connection (in_use + pending)
        self.closed = False
        self.driver_pool: Any = None
        self.guard: AsyncGenerator[None, None] | None = None
        self.asyncpg = owner.driver == "asyncpg"
        self.max_waiting = owner.max_waiting
        self.max_lifetime = owner.settings.max_lifetime
        self.recorder = owner.observer.recorder()
        self.tally = self.recorder.tally
        self.deadlines = _Deadlines(loop)
        self.conns: set[Any] = set()  # asyncpg: every open connection, for the idle sweep
        self.sweeper: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        o = self.owner
        hooks = o.hooks
        if o.driver == "asyncpg":
            reset = _rollback_only if o.mode is Mode.TRANSACTION else _reset_session
            if hooks.reset is not None:
                reset = functools.partial(_reset_then, reset, hooks.reset)
            self.driver_pool = await asyncpg.create_pool(
                min_size=o.settings.min_size,
                max_size=o.max_size,
                # Idle connections are closed by _sweep_idle, not by asyncpg's timer: asyncpg arms a timer
                # on every release and cancels it on every acquire, a heap push and a cancelled handle per
                # query (about 4 µs, as much as all of poolkit's own work per query).
                max_inactive_connection_lifetime=0,
                connect=self._asyncpg_connect,
                reset=reset,
                init=hooks.init,
                setup=hooks.setup,
                connection_class=PoolkitAsyncpgConnection,
                **o.asyncpg_connect_kwargs(),
            )
        else:
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                kwargs=o.psycopg_connect_kwargs(),
                connection_class=o.psycopg_connection_class(),
                check=_check_if_suspect,
                # configure: the app's hook runs inside _psycopg_configure, after poolkit's own set-up.
                **{
                    **psycopg_pool_options(o.settings, max_size=o.max_size, name=o.name, hooks=hooks),
                    "configure": self._psycopg_configure,
                },
            )
            await pool.open(wait=o.settings.min_size > 0, timeout=o.settings.connect_timeout)
            self.driver_pool = pool
        if self.asyncpg:
            self.sweeper = self.loop.call_later(self._sweep_interval(), self._sweep_idle)
        self.guard = self._close_with_loop()
        await self.guard.__anext__()

    async def _close_with_loop(self) -> AsyncGenerator[None, None]:
        # asyncio.run() finalises every live async generator before it closes the loop: this one's
        # finally block is how a serverless handler's `asyncio.run(main())` closes the pool's connections
        # on the way out instead of leaking them to a dead loop.
        try:
            yield
        finally:
            if not self.closed:
                await self.close(timeout=5.0)

    async def _asyncpg_connect(self, *args: Any, **kwargs: Any) -> Any:
        o = self.owner
        t0 = perf_counter()
        try:
            conn = await asyncpg.connect(*args, **kwargs)
        except Exception as exc:
            error = translate_connect_error(exc, o.dsn, connect_timeout=o.settings.connect_timeout)
            o.observer.connect_failed(error)
            raise error from None
        o.observer.opened(perf_counter() - t0)
        conn._poolkit_rec = self.recorder
        conn._poolkit_guard = o.guard
        sock = conn._transport.get_extra_info("socket")
        if sock is not None:
            conn._poolkit_poll = _poller(sock.fileno())
        # Bound to the connection itself: asyncpg hands listeners the pool proxy while one exists, and a
        # released proxy no longer knows its connection.
        conn.add_termination_listener(functools.partial(self._asyncpg_closed, conn))
        self.conns.add(conn)
        return conn

    def _sweep_interval(self) -> float:
        return min(max(self.owner.settings.idle_timeout / 4, 0.05), 5.0)

    def _sweep_idle(self) -> None:
        """Close asyncpg connections idle for ``idle_timeout`` (down to ``min_size``, as asyncpg itself would)."""
        self.sweeper = None
        if self.closed:
            return
        pool = self.driver_pool
        limit = self.owner.settings.idle_timeout
        now = monotonic()
        for raw in list(self.conns):
            since = raw._poolkit_idle_since
            if since is None or now - since < limit or raw.is_closed():
                continue
            if pool.get_size() <= pool.get_min_size():
                break
            raw._poolkit_close_reason = "idle"
            raw.terminate()  # idle, so asyncpg's own deactivation would do the same; its holder reconnects later
        self.sweeper = self.loop.call_later(self._sweep_interval(), self._sweep_idle)

    async def _psycopg_configure(self, conn: Any) -> None:
        # Per connection, not on the per-pool class: each event loop's binding has its own Recorder.
        conn._poolkit_rec = self.recorder
        configure = self.owner.hooks.configure
        if configure is not None:
            await configure(conn)

    def _asyncpg_closed(self, conn: Any, _ref: Any) -> None:
        self.conns.discard(conn)
        reason = conn._poolkit_close_reason
        if reason is None:
            # Nobody here asked for this close: the server or the network ended it (the idle sweep and the
            # lifetime check mark theirs); idle for about idle_timeout still reads as an idle close.
            idle_since = conn._poolkit_idle_since
            idle_for = monotonic() - idle_since if idle_since is not None else -1.0
            reason = "idle" if idle_for >= self.owner.settings.idle_timeout * 0.9 else "error"
        self.owner.observer.closed(reason)

    # -- acquire ------------------------------------------------------------------------------------------------

    async def replace_suspect(self, conn: Any) -> Any:
        """The idle connection's socket is readable: the server closed it or said something unasked.

        One round trip tells which; a broken connection is terminated (asyncpg reconnects its holder on the
        next acquire) and another one taken, so a caller never gets a connection that died while idle.
        """
        for _ in range(self.max_size + 1):
            raw = conn._con
            try:
                await asyncio.wait_for(asyncpg.Connection.execute(raw, "SELECT 1"), self.owner.settings.connect_timeout)
                return conn
            except BaseException as exc:
                # Failed, or the caller was cancelled mid-check: either way this connection is not trusted.
                raw._poolkit_close_reason = "error"
                raw.terminate()
                if not isinstance(exc, Exception):
                    raise
            await self.driver_pool.release(conn)  # a no-op for the terminated proxy; its holder is free again
            conn = await self.driver_pool.acquire()
            poller = conn._con._poolkit_poll
            if poller is None or not poller.poll(0):
                return conn
        return conn

    async def acquire_psycopg(self, timeout: float | None) -> Any:
        """A connection for a caller (the psycopg path; asyncpg's is inline in ``_Acquire.__aenter__``)."""
        o = self.owner
        sem = self.sem
        t0 = perf_counter()
        if sem.locked():
            if self.max_waiting and o.waiting >= self.max_waiting:
                raise o.too_many_waiting()
            limit = o.settings.acquire_timeout if timeout is None else timeout
            self.tally.waited()
            o.waiting += 1
            waiter = self.deadlines.add(limit)
            task = waiter.task
            try:
                await sem.acquire()
            except asyncio.CancelledError:
                if waiter.expired and task is not None and task.uncancel() <= waiter.cancelling:
                    self.tally.acquired(perf_counter() - t0)
                    raise o.exhausted(limit) from None
                raise
            finally:
                o.waiting -= 1
                waiter.task = None
                self.deadlines.done()
            if waiter.expired and task is not None:
                task.uncancel()
        else:
            await sem.acquire()
        try:
            try:
                conn = await self.driver_pool.getconn(timeout=0.2)
            except PsycopgPoolTimeout:
                conn = None
            if conn is None:  # outside the except block: a connect error must not carry the PoolTimeout
                conn = await self._getconn_slowly(perf_counter() - t0)
        except BaseException:
            sem.release()
            raise
        self.in_use += 1
        self.tally.acquired(perf_counter() - t0)
        return conn

    async def _getconn_slowly(self, spent: float) -> Any:
        # A slot is free (the semaphore says so): psycopg only waits here while it opens a connection,
        # in its own worker, which logs and retries failures. Short waits let the first failure surface
        # at once (a wrong password should not look like a 10 s timeout).
        o = self.owner
        start = monotonic() - spent
        deadline = start + o.settings.connect_timeout + 1.0
        while True:
            error = o.observer.recent_connect_error(within=monotonic() - start)
            if error is not None:
                raise fresh_copy(error)
            if monotonic() >= deadline:
                raise ConnectTimeout(
                    f"pool {o.name!r} could not open a connection to {o.dsn.host}:{o.dsn.port} within "
                    f"connect_timeout={o.settings.connect_timeout:g}s; check the host and port, or raise "
                    "POOLKIT_CONNECT_TIMEOUT",
                    reason="timeout",
                ) from None
            try:
                return await self.driver_pool.getconn(timeout=min(0.2, max(deadline - monotonic(), 0.01)))
            except PsycopgPoolTimeout:
                continue

    # -- release ------------------------------------------------------------------------------------------------

    async def release(self, conn: Any, exc: BaseException | None) -> None:
        """Give ``conn`` back (the psycopg path; asyncpg's is inline in ``_Acquire.__aexit__``)."""
        self.in_use -= 1
        try:
            try:
                if not conn.closed:
                    if conn.pgconn.transaction_status != _IDLE:
                        # The psycopg_pool.connection() contract: commit on success, roll back on error.
                        if exc is None:
                            await conn.commit()
                        else:
                            await conn.rollback()
                    if conn._poolkit_dirty:
                        await _reset_psycopg(conn)
            finally:
                # Even when COMMIT failed (the server went away): psycopg_pool replaces a broken connection,
                # and one never given back would be a slot lost for good.
                if conn.pgconn.transaction_status == _UNKNOWN:
                    conn.poolkit_lost()
                await self.driver_pool.putconn(conn)
        finally:
            self.sem.release()

    def idle_and_size(self) -> tuple[int, int]:
        pool = self.driver_pool
        if pool is None:
            return 0, 0
        if self.owner.driver == "asyncpg":
            return pool.get_idle_size(), pool.get_size()
        stats = pool.get_stats()
        return stats.get("pool_available", 0), stats.get("pool_size", 0)

    async def close(self, timeout: float) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadlines.cancel()
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        self.owner.observer.closing = True
        pool = self.driver_pool
        if pool is None:
            return
        if self.owner.driver == "asyncpg":
            try:
                await asyncio.wait_for(pool.close(), timeout)
            except TimeoutError:
                pool.terminate()
        else:
            await pool.close(timeout=timeout)

    def sockets(self) -> list[int]:
        """File descriptors of every open connection (for the fork guard)."""
        fds: list[int] = []
        pool = self.driver_pool
        if pool is None:
            return fds
        if self.owner.driver == "asyncpg":
            for holder in getattr(pool, "_holders", []):
                con = getattr(holder, "_con", None)
                transport = getattr(con, "_transport", None) if con is not None else None
                sock = transport.get_extra_info("socket") if transport is not None else None
                if sock is not None:
                    fds.append(sock.fileno())
        else:
            for conn in list(getattr(pool, "_pool", [])) + list(getattr(pool, "_used", set())):
                if not conn.closed:
                    fds.append(conn.pgconn.socket)
        return fds


def _closed_error(exc: BaseException, name: str) -> PoolClosed | None:
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and ("closed" in str(exc) or "closing" in str(exc)):
        return PoolClosed(f"pool {name!r} is closed")
    return None


# What the direct route's release adds to asyncpg's reset (advisory unlocks, CLOSE ALL, UNLISTEN, RESET ALL)
# after the connection ran a statement that leaves session state: RESET ALL keeps the role (SET ROLE), temp
# tables and SQL-level prepared statements. asyncpg's own statements (__asyncpg_*) stay: its statement cache
# refers to them by name. DISCARD ALL would drop those too.
_FULL_RESET_EXTRA = (
    "SET SESSION AUTHORIZATION DEFAULT;\n"
    "DISCARD TEMP;\n"
    "DO $poolkit$DECLARE s record; BEGIN FOR s IN SELECT name FROM pg_prepared_statements "
    "WHERE name NOT LIKE '\\_\\_asyncpg\\_%' LOOP EXECUTE format('DEALLOCATE %I', s.name); END LOOP; END$poolkit$;"
)


async def _reset_session(conn: Any) -> None:
    # asyncpg's default reset (RESET ALL, UNLISTEN, advisory unlocks), run past the timing wrapper: it is the
    # pool's statement, not the app's. The full reset only when the session guard saw session state.
    query = conn.get_reset_query()
    if conn._poolkit_dirty:
        conn._poolkit_dirty = False
        query = f"{query}\n{_FULL_RESET_EXTRA}"
    if query:
        await asyncpg.Connection.execute(conn, query)


async def _reset_psycopg(conn: Any) -> None:
    # psycopg_pool resets nothing by default, so session state passes to the next borrower. DISCARD ALL (one
    # round trip, only after a statement the session guard flagged) clears all of it; psycopg sees the
    # command tag and drops its own prepared-statement cache with it. Done here rather than through
    # psycopg_pool's `reset=`, which returns every connection through a worker task (a hop per release).
    # A connection that cannot be reset is closed: the pool replaces it.
    conn._poolkit_dirty = False
    try:
        autocommit = conn.autocommit
        await conn.set_autocommit(True)
        await psycopg.AsyncCursor(conn).execute("DISCARD ALL")
        await conn.set_autocommit(autocommit)
    except Exception:
        await conn.close()


def socket_has_data(fd: int) -> bool:
    """True if an idle connection's socket is readable: EOF or a message the server sent unasked
    (``terminating connection due to administrator command``, a shutdown notice)."""
    try:
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


async def _check_if_suspect(conn: Any) -> None:
    # An idle connection has nothing to say; a readable socket means the server closed or is closing it.
    # That costs a poll instead of psycopg_pool's check round trip on every checkout (which measured at
    # 0.7x of the raw pool's throughput), and a broken connection still never reaches the caller.
    if conn.closed or socket_has_data(conn.pgconn.socket):
        try:
            await AsyncConnectionPool.check_connection(conn)
        except Exception:
            conn.poolkit_lost()
            raise


async def _reset_then(first: Callable[[Any], Any], then: Callable[[Any], Any], conn: Any) -> None:
    # poolkit's reset (session clean-up), then the app's reset hook.
    await first(conn)
    await then(conn)


async def _rollback_only(conn: Any) -> None:
    # Behind a transaction pooler the session state that asyncpg's default RESET ALL clears cannot exist
    # (every transaction may land on another server, and the session guard refuses statements that would
    # leave it), so that round trip per release is pure cost. asyncpg has already rolled back an open
    # transaction before calling this.
    return None


class Pool(PoolBase):
    """An async connection pool for asyncpg or psycopg, configured for where it connects.

    Use ``async with pool.acquire() as conn`` for the driver's own connection object, or the
    ``execute`` / ``fetch`` / ``fetchrow`` / ``fetchval`` shortcuts (placeholders are the driver's:
    ``$1`` for asyncpg, ``%s`` for psycopg).
    """

    def __init__(self, settings: Settings, *, route: Route = "pooled", hooks: ConnectionHooks | None = None) -> None:
        self._bindings: dict[int, _Binding] = {}
        self._hot: _Binding | None = None
        super().__init__(settings, route=route, driver=settings.driver, hooks=hooks)
        self._opening: dict[int, asyncio.Future[_Binding]] = {}
        self._pid = os.getpid()
        self._psycopg_class: type[Any] | None = None

    # -- configuration handed to the drivers ------------------------------------------------------------------

    def asyncpg_connect_kwargs(self) -> dict[str, Any]:
        dsn = self.dsn
        params = dsn.without_params(*detect.TOOL_ONLY_PARAMS).query
        server_settings = {"application_name": self.settings.application_name}
        server_settings.update({k: v for k, v in params.items() if k not in ("options", "target_session_attrs")})
        return {
            "host": dsn.host,
            "port": dsn.port,
            "user": dsn.user,
            "password": dsn.password,
            "database": dsn.database,
            "ssl": self.tls.ssl_context(),
            "timeout": self.settings.connect_timeout,
            "server_settings": server_settings,
            **detect.asyncpg_statement_options(self.mode),
        }

    def psycopg_connect_kwargs(self) -> dict[str, Any]:
        return self._psycopg_kwargs(_ObservedAsyncCursor)

    def psycopg_connection_class(self) -> type[Any]:
        if self._psycopg_class is None:
            self._psycopg_class = type(
                "PoolkitAsyncConnection",
                (_PoolkitAsyncConnection,),
                {
                    "poolkit_observer": self.observer,
                    "poolkit_dsn": self.dsn,
                    "poolkit_connect_timeout": self.settings.connect_timeout,
                    "poolkit_max_lifetime": self.settings.max_lifetime,
                    "_poolkit_guard": self.guard,
                },
            )
        return self._psycopg_class

    # -- the loop binding -------------------------------------------------------------------------------------

    async def _binding(self) -> _Binding:
        # The slow path of _Acquire: the fast one reuses `_hot` when it belongs to the running loop. Forked
        # children never get that far: the at-fork hook (pool_base.install_fork_hook) clears `_hot`.
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed: create a new one (or call poolkit.get_pool() again)")
        if self._pid != os.getpid():
            self._forget_after_fork()
        loop = get_running_loop()
        binding = self._bindings.get(id(loop))
        if binding is None or binding.loop is not loop or binding.closed:
            binding = await self._bind(loop)
        self._hot = binding
        return binding

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> _Binding:
        key = id(loop)
        pending = self._opening.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        self._drop_dead_bindings()
        future: asyncio.Future[_Binding] = loop.create_future()
        self._opening[key] = future
        try:
            binding = _Binding(self, loop)
            try:
                await binding.open()
            except BaseException:
                self.observer.retire(binding.recorder)
                raise
            self._bindings[key] = binding
            future.set_result(binding)
            return binding
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: a lone opener must not log "exception never retrieved"
            raise
        finally:
            del self._opening[key]

    def _drop_dead_bindings(self) -> None:
        for key, binding in list(self._bindings.items()):
            if binding.loop.is_closed() or binding.closed:
                # The loop died without asyncio.run()'s clean-up: its transports cannot be closed through it,
                # so close the sockets themselves; the server sees EOF and ends the backends.
                if not binding.closed:
                    for fd in binding.sockets():
                        _neutralise_fd(fd)
                del self._bindings[key]
                self.observer.retire(binding.recorder)
                if self._hot is binding:
                    self._hot = None

    def _forget_after_fork(self) -> None:
        """In a forked child: never touch the parent's sockets, start afresh lazily."""
        state = get_state()
        self._hot = None
        for binding in self._bindings.values():
            for fd in binding.sockets():
                _neutralise_fd(fd)
            self.observer.retire(binding.recorder)
            state.inherited.append(binding)  # kept alive: a finaliser must not run on the parent's objects
        self._bindings = {}
        self._opening = {}
        self.waiting = 0
        self._pid = os.getpid()
        if self._direct is not None:
            self._direct._forget_after_fork()

    # -- public API -------------------------------------------------------------------------------------------

    async def open(self) -> Pool:
        """Bind to the running loop and open one connection to check the settings (fails fast)."""
        async with self.acquire():
            pass
        return self

    def acquire(self, *, timeout: float | None = None) -> _Acquire:
        """``async with pool.acquire() as conn``: a connection, or PoolTimeout after ``acquire_timeout``."""
        return _Acquire(self, timeout)

    def connection(self, timeout: float | None = None) -> _Acquire:
        """``async with pool.connection() as conn``: psycopg_pool's name for :meth:`acquire`, same behaviour.

        With psycopg the block commits on success and rolls back on error, as psycopg_pool's does.
        """
        return _Acquire(self, timeout)

    def as_user(self, claims: Any, *, role: str | None = "authenticated") -> Any:
        """``async with pool.as_user(claims) as conn``: a transaction under RLS claims and role (poolkit.rls)."""
        from poolkit.rls import as_user  # noqa: PLC0415 - poolkit.rls refers back to this module

        return as_user(self, claims, role=role)

    async def execute(self, query: Any, *args: Any, timeout: float | None = None) -> str:
        """Run a statement; return its status tag (e.g. ``INSERT 0 1``)."""
        async with self.acquire() as conn:
            try:
                if self.driver == "asyncpg":
                    status: str = await conn.execute(query, *args, timeout=timeout)
                    return status
                cur = await conn.execute(query, args or None)
                return str(cur.statusmessage or "")
            except Exception as exc:
                raise self._translated(exc) from exc

    async def fetch(self, query: Any, *args: Any) -> list[Any]:
        """All rows (asyncpg Records, psycopg tuples)."""
        async with self.acquire() as conn:
            try:
                if self.driver == "asyncpg":
                    rows: list[Any] = await conn.fetch(query, *args)
                    return rows
                cur = await conn.execute(query, args or None)
                return list(await cur.fetchall())
            except Exception as exc:
                raise self._translated(exc) from exc

    async def fetchrow(self, query: Any, *args: Any) -> Any:
        """The first row, or None."""
        async with self.acquire() as conn:
            try:
                if self.driver == "asyncpg":
                    return await conn.fetchrow(query, *args)
                cur = await conn.execute(query, args or None)
                return await cur.fetchone()
            except Exception as exc:
                raise self._translated(exc) from exc

    async def fetchval(self, query: Any, *args: Any) -> Any:
        """The first column of the first row, or None."""
        async with self.acquire() as conn:
            try:
                if self.driver == "asyncpg":
                    return await conn.fetchval(query, *args)
                row = await (await conn.execute(query, args or None)).fetchone()
                return None if row is None else row[0]
            except Exception as exc:
                raise self._translated(exc) from exc

    def _translated(self, exc: Exception) -> Exception:
        return translate_query_error(exc, self.mode, pool=self.name) or exc

    async def close(self, timeout: float = 10.0) -> None:
        """Let checked-out connections come back (up to ``timeout``), then close every connection."""
        self._closed = True
        self._hot = None
        for binding in list(self._bindings.values()):
            if binding.loop is asyncio.get_running_loop():
                await binding.close(timeout)
            elif binding.loop.is_running():
                fut = asyncio.run_coroutine_threadsafe(binding.close(timeout), binding.loop)
                await asyncio.wrap_future(fut)
        self._drop_dead_bindings()
        for binding in self._bindings.values():
            self.observer.retire(binding.recorder)
        self._bindings.clear()
        if self._direct is not None:
            await self._direct.close(timeout)
        get_state().live_pools.discard(self)

    def gauge_values(self) -> tuple[int, int, int, int, int]:
        in_use = idle = 0
        for binding in list(self._bindings.values()):
            in_use += binding.in_use
            idle += binding.idle_and_size()[0]
        return in_use, idle, self.max_size, self.settings.min_size, self.waiting


class _Acquire:
    """``async with pool.acquire()``; a class rather than @asynccontextmanager: it is on every query's path."""

    # The last four: this object is also the waiter record _Deadlines keeps while it waits (asyncpg).
    __slots__ = ("_binding", "_conn", "_pool", "_timeout", "cancelling", "deadline", "expired", "task")

    def __init__(self, pool: Pool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._binding: _Binding | None = None
        self._conn: Any = None

    async def __aenter__(self) -> Any:
        # The binding of the running loop, without a dict lookup or a coroutine when it is the last one used.
        binding = self._pool._hot
        if binding is None or binding.loop is not get_running_loop() or binding.closed:
            binding = await self._pool._binding()
        if not binding.asyncpg:
            self._conn = await binding.acquire_psycopg(self._timeout)
            self._binding = binding
            return self._conn
        # asyncpg, inline rather than in a coroutine of the binding's: this is on every query's path, and on a
        # busy pool every acquisition takes the waiting branch.
        # asyncpg's pool queues waiters itself. A second queue in front of it (the semaphore the psycopg path
        # uses) cost an extra wake-up per hand-off: 0.82x of the raw pool's throughput, against 0.98x without.
        # `claimed` counts holders and queued waiters alike, so below max_size a connection is free in
        # asyncpg's queue right now (opening one is bounded by connect_timeout).
        t0 = perf_counter()
        must_wait = binding.claimed >= binding.max_size
        if must_wait and binding.max_waiting and self._pool.waiting >= binding.max_waiting:
            raise self._pool.too_many_waiting()
        binding.claimed += 1
        if not must_wait:
            try:
                conn = await binding.driver_pool.acquire()
            except BaseException as exc:
                binding.claimed -= 1
                closed = _closed_error(exc, self._pool.name)
                if closed is not None:
                    raise closed from None
                raise
        else:
            pool = self._pool
            limit = pool.settings.acquire_timeout if self._timeout is None else self._timeout
            binding.tally.waited()
            pool.waiting += 1
            # _Deadlines.add, inline and with this object as the waiter record.
            deadlines = binding.deadlines
            loop = binding.loop
            self.task = task = asyncio.current_task(loop)
            self.cancelling = task.cancelling() if task is not None else 0
            self.expired = False
            self.deadline = deadline = loop.time() + limit
            deadlines.queue.append(self)
            if deadline < deadlines.armed:
                deadlines.arm(deadline)
            try:
                conn = await binding.driver_pool.acquire()
            except asyncio.CancelledError:
                binding.claimed -= 1
                if self.expired and task is not None and task.uncancel() <= self.cancelling:
                    binding.tally.acquired(perf_counter() - t0)
                    raise pool.exhausted(limit) from None
                raise
            except BaseException as exc:
                binding.claimed -= 1
                closed = _closed_error(exc, pool.name)
                if closed is not None:
                    raise closed from None
                raise
            finally:
                pool.waiting -= 1
                self.task = None
                deadlines.done()
            if self.expired and task is not None:
                task.uncancel()  # served at the deadline: the cancel request never reached the task
        raw = conn._con
        poller = raw._poolkit_poll
        if poller is not None and poller.poll(0):
            try:
                conn = await binding.replace_suspect(conn)
            except BaseException:
                binding.claimed -= 1
                raise
            raw = conn._con
        raw._poolkit_idle_since = None
        binding.in_use += 1
        binding.tally.acquired(perf_counter() - t0)
        self._conn = conn
        self._binding = binding
        return conn

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        binding, conn = self._binding, self._conn
        self._binding = self._conn = None
        if binding is None:
            return
        if not binding.asyncpg:
            await binding.release(conn, exc)
            return
        # asyncpg's release, inline rather than in a coroutine of the binding's: it is on every query's path.
        binding.in_use -= 1
        try:
            raw = conn._con  # the proxy's connection: its slots are settable, the proxy's are not
            if raw is not None:
                now = raw._poolkit_idle_since = monotonic()
                if now - raw._poolkit_opened >= binding.max_lifetime and not raw.is_closed():
                    raw._poolkit_close_reason = "lifetime"
                    await raw.close(timeout=5.0)
            # asyncpg's reset fails when the connection died after the caller's last statement (e.g. right
            # after COMMIT). asyncpg has already discarded it (counted as closed with reason "error");
            # raising here would report work that committed as failed.
            with contextlib.suppress(Exception):
                await binding.driver_pool.release(conn)
        finally:
            binding.claimed -= 1


def _neutralise_fd(fd: int) -> None:
    # Point the child's copy of the descriptor at /dev/null: whatever the child's copies of the driver
    # objects write later (libpq's Terminate, a TLS close_notify) cannot reach the parent's session.
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


async def create_pool(
    *,
    driver: str | None = None,
    open: bool = True,
    settings: Settings | None = None,
    init: Callable[[Any], Coroutine[Any, Any, Any]] | None = None,
    setup: Callable[[Any], Coroutine[Any, Any, Any]] | None = None,
    configure: Callable[[Any], Coroutine[Any, Any, Any]] | None = None,
    reset: Callable[[Any], Coroutine[Any, Any, Any]] | None = None,
    **overrides: Any,
) -> Pool:
    """Create an async pool from the environment plus keyword overrides, and check it can connect.

    ``driver`` is ``"asyncpg"`` (default) or ``"psycopg"``. Every setting of :class:`poolkit.Settings`
    can be passed by keyword. With ``open=False`` nothing connects until the first acquire.

    Connection hooks, async functions that take the connection, as the drivers' own pools take them:
    asyncpg's ``init`` (once per new connection: ``set_type_codec``, ...) and ``setup`` (every checkout),
    psycopg_pool's ``configure`` (once per new connection: ``conn.adapters``, ...), and ``reset`` (when a
    connection comes back, after poolkit's own clean-up; both drivers). See
    :class:`poolkit.pool_base.ConnectionHooks`.
    """
    from poolkit.settings import load_settings  # noqa: PLC0415 - keeps import order simple for reloads

    if driver is not None:
        overrides["driver"] = driver
    cfg = settings if settings is not None and not overrides else load_settings(**overrides)
    hooks = ConnectionHooks.for_driver(
        cfg.driver, asynchronous=True, init=init, setup=setup, configure=configure, reset=reset
    )
    pool = Pool(cfg, hooks=hooks)
    if open:
        try:
            await pool.open()
        except BaseException:
            await pool.close(timeout=1.0)
            raise
    return pool


__all__ = ["ConnectError", "Pool", "create_pool"]
