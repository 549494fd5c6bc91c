"""The asyncpg driver of the async ``Pool``: instrumented connections, the per-loop asyncpg pool, acquire/release."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import select
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from time import monotonic, perf_counter
from typing import Any

import asyncpg

from poolkit.core import detect
from poolkit.core.detect import Mode
from poolkit.core.translate import translate_connect_error
from poolkit.errors import PoolClosed
from poolkit.obs.observe import Recorder
from poolkit.pool.driver import Acquire, AsyncDriver, Binding, PoolServices, Transaction

_get_running_loop = asyncio.get_running_loop


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


def _poller(fd: int) -> Any:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller


def connect_kwargs(owner: PoolServices) -> dict[str, Any]:
    """asyncpg's connect arguments for the pool's target (statement cache off behind a transaction pooler)."""
    dsn = owner.dsn
    params = dsn.without_params(*detect.TOOL_ONLY_PARAMS).query
    server_settings = {"application_name": owner.settings.application_name}
    server_settings.update({k: v for k, v in params.items() if k not in ("options", "target_session_attrs")})
    return {
        "host": dsn.host,
        "port": dsn.port,
        "user": dsn.user,
        "password": dsn.password,
        "database": dsn.database,
        "ssl": owner.tls.ssl_context(),
        "timeout": owner.settings.connect_timeout,
        "server_settings": server_settings,
        **detect.asyncpg_statement_options(owner.mode),
    }


class AsyncpgBinding(Binding):
    """The asyncpg pool of one event loop, with poolkit's idle sweep instead of asyncpg's per-release timer."""

    def __init__(self, owner: PoolServices, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(owner, loop)
        self.claimed = 0  # callers holding or about to get a connection (in_use + pending)
        self.conns: set[Any] = set()  # every open connection, for the idle sweep
        self.sweeper: asyncio.TimerHandle | None = None

    async def open_driver_pool(self) -> None:
        o = self.owner
        hooks = o.hooks
        reset: Callable[[Any], Awaitable[None]] = _rollback_only if o.mode is Mode.TRANSACTION else _reset_session
        if hooks.reset is not None:
            reset = functools.partial(_reset_then, reset, hooks.reset)
        self.driver_pool = await asyncpg.create_pool(
            min_size=o.settings.min_size,
            max_size=o.max_size,
            # Idle connections are closed by _sweep_idle, not by asyncpg's timer: asyncpg arms a timer on every
            # release and cancels it on every acquire, a heap push and a cancelled handle per query (about
            # 4 µs, as much as all of poolkit's own work per query).
            max_inactive_connection_lifetime=0,
            connect=self._connect,
            reset=reset,
            init=hooks.init,
            setup=hooks.setup,
            connection_class=PoolkitAsyncpgConnection,
            **connect_kwargs(o),
        )
        self.sweeper = self.loop.call_later(self._sweep_interval(), self._sweep_idle)

    async def _connect(self, *args: Any, **kwargs: Any) -> Any:
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
        conn.add_termination_listener(functools.partial(self._closed_by_driver, conn))
        self.conns.add(conn)
        return conn

    def _sweep_interval(self) -> float:
        return min(max(self.owner.settings.idle_timeout / 4, 0.05), 5.0)

    def _sweep_idle(self) -> None:
        """Close connections idle for ``idle_timeout`` (down to ``min_size``, as asyncpg itself would)."""
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

    def _closed_by_driver(self, conn: Any, _ref: Any) -> None:
        self.conns.discard(conn)
        reason = conn._poolkit_close_reason
        if reason is None:
            # Nobody here asked for this close: the server or the network ended it (the idle sweep and the
            # lifetime check mark theirs); idle for about idle_timeout still reads as an idle close.
            idle_since = conn._poolkit_idle_since
            idle_for = monotonic() - idle_since if idle_since is not None else -1.0
            reason = "idle" if idle_for >= self.owner.settings.idle_timeout * 0.9 else "error"
        self.owner.observer.closed(reason)

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

    async def close_driver_pool(self, timeout: float) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        try:
            await asyncio.wait_for(self.driver_pool.close(), timeout)
        except TimeoutError:
            self.driver_pool.terminate()

    def idle_and_size(self) -> tuple[int, int]:
        pool = self.driver_pool
        if pool is None:
            return 0, 0
        return pool.get_idle_size(), pool.get_size()

    def sockets(self) -> list[int]:
        fds: list[int] = []
        for holder in getattr(self.driver_pool, "_holders", []):
            con = getattr(holder, "_con", None)
            transport = getattr(con, "_transport", None) if con is not None else None
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                fds.append(sock.fileno())
        return fds


class AsyncpgAcquire(Acquire):
    """asyncpg's acquire and release, inline rather than in coroutines of the binding's: every query passes here."""

    __slots__ = ()

    async def __aenter__(self) -> Any:  # noqa: PLR0915 - inline on purpose: every acquisition runs it, a helper would add a frame
        pool = self._pool
        # The binding of the running loop, without a dict lookup or a coroutine when it is the last one used.
        binding: Any = pool._hot
        if binding is None or binding.loop is not _get_running_loop() or binding.closed:
            binding = await pool._binding()
        # asyncpg's pool queues waiters itself. A second queue in front of it (a semaphore, as the psycopg
        # driver has) cost an extra wake-up per hand-off: 0.82x of the raw pool's throughput, against 0.98x
        # without. `claimed` counts holders and queued waiters alike, so below max_size a connection is free
        # in asyncpg's queue right now (opening one is bounded by connect_timeout).
        t0 = perf_counter()
        must_wait = binding.claimed >= binding.max_size
        if must_wait and binding.max_waiting and pool.waiting >= binding.max_waiting:
            raise pool.too_many_waiting()
        binding.claimed += 1
        if not must_wait:
            try:
                conn = await binding.driver_pool.acquire()
            except BaseException as exc:
                binding.claimed -= 1
                _raise_if_closed(exc, pool.name)
                raise
        else:
            limit = pool.settings.acquire_timeout if self._timeout is None else self._timeout
            binding.tally.waited()
            pool.waiting += 1
            deadlines = binding.deadlines
            task = deadlines.add(self, limit)
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
                _raise_if_closed(exc, pool.name)
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


def _raise_if_closed(exc: BaseException, name: str) -> None:
    """asyncpg's "pool is closed/closing" as poolkit's PoolClosed (any other error is the caller's to re-raise)."""
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and ("closed" in str(exc) or "closing" in str(exc)):
        raise PoolClosed(f"pool {name!r} is closed") from None


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


class AsyncpgDriver(AsyncDriver):
    """asyncpg: ``$n`` placeholders, the driver's own query methods, its ``Transaction`` object."""

    name = "asyncpg"
    binding = AsyncpgBinding
    acquire = AsyncpgAcquire

    def sql(self, text: str) -> str:
        return text

    def execute(self, conn: Any, query: Any, args: Sequence[Any], timeout: float | None) -> Awaitable[str]:
        result: Awaitable[str] = conn.execute(query, *args, timeout=timeout)
        return result

    def fetch(self, conn: Any, query: Any, args: Sequence[Any]) -> Awaitable[list[Any]]:
        result: Awaitable[list[Any]] = conn.fetch(query, *args)
        return result

    def fetchrow(self, conn: Any, query: Any, args: Sequence[Any]) -> Awaitable[Any]:
        result: Awaitable[Any] = conn.fetchrow(query, *args)
        return result

    def fetchval(self, conn: Any, query: Any, args: Sequence[Any]) -> Awaitable[Any]:
        result: Awaitable[Any] = conn.fetchval(query, *args)
        return result

    async def begin(self, conn: Any, isolation: str | None = None) -> Transaction:
        tx: Transaction = conn.transaction(isolation=isolation)
        await tx.start()  # type: ignore[attr-defined]
        return tx


DRIVER = AsyncpgDriver()
