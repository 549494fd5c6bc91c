"""The async ``Pool``: one wrapper over asyncpg and psycopg-pool that is loop-, fork- and reload-safe."""

from __future__ import annotations

import asyncio
import os
import select
import time
from collections.abc import AsyncGenerator, Coroutine
from typing import Any

import asyncpg
import psycopg
from psycopg_pool import AsyncConnectionPool
from psycopg_pool import PoolTimeout as PsycopgPoolTimeout

from poolkit import detect
from poolkit.detect import Mode
from poolkit.dsn import Dsn
from poolkit.errors import ConnectError, ConnectTimeout, PoolClosed
from poolkit.observe import Observer
from poolkit.pool_base import PoolBase, Route
from poolkit.settings import Settings
from poolkit.state import get_state
from poolkit.translate import translate_connect_error, translate_query_error


class PoolkitAsyncpgConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg connection that times the app's statements and remembers its open/close story (for metrics).

    The query methods are timed here rather than with ``add_query_logger``: asyncpg builds a record and
    schedules a callback per logged query, which measured at ~15 % of a SELECT 1's throughput; a wrapper costs
    two clock reads. asyncpg's own methods call its private ``_execute``, so nothing is counted twice.
    """

    __slots__ = ("_poolkit_close_reason", "_poolkit_idle_since", "_poolkit_obs", "_poolkit_opened")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._poolkit_opened = time.monotonic()
        self._poolkit_close_reason: str | None = None
        self._poolkit_idle_since: float | None = time.monotonic()
        self._poolkit_obs: Observer | None = None

    async def _observed(self, query: str, call: Coroutine[Any, Any, Any]) -> Any:
        obs = self._poolkit_obs
        if obs is None:
            return await call
        t0 = time.perf_counter()
        try:
            result = await call
        except BaseException as exc:
            obs.query(query, time.perf_counter() - t0, exc)
            raise
        obs.query(query, time.perf_counter() - t0, None)
        return result

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._observed(query, super().execute(query, *args, timeout=timeout))

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> Any:
        return await self._observed(command, super().executemany(command, args, timeout=timeout))

    async def fetch(self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None) -> Any:
        return await self._observed(query, super().fetch(query, *args, timeout=timeout, record_class=record_class))

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None) -> Any:
        call = super().fetchrow(query, *args, timeout=timeout, record_class=record_class)
        return await self._observed(query, call)

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        return await self._observed(query, super().fetchval(query, *args, column=column, timeout=timeout))


class _ObservedAsyncCursor(psycopg.AsyncCursor[Any]):
    """psycopg cursor that times each statement for the pool's Observer."""

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        obs: Observer | None = getattr(self.connection, "poolkit_observer", None)
        if obs is None:
            return await super().execute(query, params, **kwargs)
        t0 = time.perf_counter()
        try:
            result = await super().execute(query, params, **kwargs)
        except BaseException as exc:
            obs.query(query, time.perf_counter() - t0, exc)
            raise
        obs.query(query, time.perf_counter() - t0, None)
        return result

    async def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        obs: Observer | None = getattr(self.connection, "poolkit_observer", None)
        t0 = time.perf_counter()
        try:
            await super().executemany(query, params_seq, **kwargs)
        except BaseException as exc:
            if obs is not None:
                obs.query(query, time.perf_counter() - t0, exc)
            raise
        if obs is not None:
            obs.query(query, time.perf_counter() - t0, None)


class _PoolkitAsyncConnection(psycopg.AsyncConnection[Any]):
    """psycopg connection bound to one pool's Observer (set on a per-pool subclass)."""

    poolkit_observer: Observer | None = None
    poolkit_dsn: Dsn | None = None
    poolkit_connect_timeout: float = 10.0
    poolkit_max_lifetime: float = 0.0

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        obs = cls.poolkit_observer
        t0 = time.perf_counter()
        try:
            conn = await super().connect(conninfo, **kwargs)
        except Exception as exc:
            if obs is None or cls.poolkit_dsn is None:
                raise
            error = translate_connect_error(exc, cls.poolkit_dsn, connect_timeout=cls.poolkit_connect_timeout)
            obs.connect_failed(error)
            raise error from None
        conn._poolkit_opened = time.monotonic()  # type: ignore[attr-defined]
        if obs is not None:
            obs.opened(time.perf_counter() - t0)
        return conn

    async def close(self) -> None:
        obs = self.poolkit_observer
        if obs is not None and not getattr(self, "_poolkit_counted", False):
            self._poolkit_counted = True
            age = time.monotonic() - getattr(self, "_poolkit_opened", time.monotonic())
            if self.broken:
                reason = "error"
            elif self.poolkit_max_lifetime and age >= self.poolkit_max_lifetime:
                reason = "lifetime"
            else:
                reason = "idle"
            obs.closed(reason)
        await super().close()


class _Binding:
    """A pool's driver pool on one event loop: asyncio objects belong to the loop that made them."""

    def __init__(self, owner: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.sem = asyncio.Semaphore(owner.max_size)
        self.in_use = 0
        self.claimed = 0  # asyncpg: callers holding or about to get a connection (in_use + pending)
        self.closed = False
        self.driver_pool: Any = None
        self.guard: AsyncGenerator[None, None] | None = None

    async def open(self) -> None:
        o = self.owner
        if o.driver == "asyncpg":
            self.driver_pool = await asyncpg.create_pool(
                min_size=o.settings.min_size,
                max_size=o.max_size,
                max_inactive_connection_lifetime=o.settings.idle_timeout,
                connect=self._asyncpg_connect,
                reset=_rollback_only if o.mode is Mode.TRANSACTION else _reset_session,
                connection_class=PoolkitAsyncpgConnection,
                **o.asyncpg_connect_kwargs(),
            )
        else:
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                conninfo="",
                kwargs=o.psycopg_connect_kwargs(),
                connection_class=o.psycopg_connection_class(),
                min_size=o.settings.min_size,
                max_size=o.max_size,
                open=False,
                name=o.name,
                timeout=o.settings.acquire_timeout,
                max_idle=o.settings.idle_timeout,
                max_lifetime=o.settings.max_lifetime,
                reconnect_timeout=max(o.settings.connect_timeout * 3, 30.0),
                check=_check_if_suspect,
            )
            await pool.open(wait=o.settings.min_size > 0, timeout=o.settings.connect_timeout)
            self.driver_pool = pool
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
        t0 = time.perf_counter()
        try:
            conn = await asyncpg.connect(*args, **kwargs)
        except Exception as exc:
            error = translate_connect_error(exc, o.dsn, connect_timeout=o.settings.connect_timeout)
            o.observer.connect_failed(error)
            raise error from None
        o.observer.opened(time.perf_counter() - t0)
        conn._poolkit_obs = o.observer
        conn.add_termination_listener(self._asyncpg_closed)
        return conn

    def _asyncpg_closed(self, conn: Any) -> None:
        try:
            reason = conn._poolkit_close_reason
        except AttributeError:  # a released pool proxy: its connection is gone, so nobody marked it
            reason = None
        if reason is None:
            # Nobody here asked for this close: asyncpg's idle deactivation (idle for idle_timeout), or the
            # server or network ended it (in use, or idle for less than that).
            idle_since = conn._poolkit_idle_since
            idle_for = time.monotonic() - idle_since if idle_since is not None else -1.0
            reason = "idle" if idle_for >= self.owner.settings.idle_timeout * 0.9 else "error"
        self.owner.observer.closed(reason)

    async def acquire(self, timeout: float | None) -> Any:
        if self.owner.driver == "asyncpg":
            return await self._acquire_asyncpg(timeout)
        o = self.owner
        inst = o.observer.inst
        sem = self.sem
        t0 = time.perf_counter()
        if sem.locked():
            inst.acquire_waits.inc()
            o.waiting += 1
            limit = o.settings.acquire_timeout if timeout is None else timeout
            try:
                async with asyncio.timeout(limit):
                    await sem.acquire()
            except TimeoutError:
                raise o.exhausted(limit, time.perf_counter() - t0) from None
            finally:
                o.waiting -= 1
        else:
            await sem.acquire()
        try:
            conn = await self._driver_acquire()
        except BaseException:
            sem.release()
            raise
        self.in_use += 1
        inst.acquire_duration.observe(time.perf_counter() - t0)
        return conn

    async def _acquire_asyncpg(self, timeout: float | None) -> Any:
        # asyncpg's pool queues waiters itself. A second queue in front of it (the semaphore the psycopg path
        # uses) cost an extra wake-up per hand-off: 0.82x of the raw pool's throughput, against 0.98x without.
        o = self.owner
        inst = o.observer.inst
        t0 = time.perf_counter()
        limit = o.settings.acquire_timeout if timeout is None else timeout
        must_wait = self.claimed >= o.max_size
        self.claimed += 1
        if must_wait:
            inst.acquire_waits.inc()
            o.waiting += 1
        try:
            if must_wait:
                async with asyncio.timeout(limit):
                    conn = await self._driver_acquire()
            else:
                # `claimed` counts holders and queued waiters alike, so below max_size a connection is free
                # in asyncpg's queue right now; opening one is bounded by connect_timeout.
                conn = await self._driver_acquire()
        except TimeoutError:
            if not must_wait:
                self.claimed -= 1
                raise
            self.claimed -= 1
            raise o.exhausted(limit, time.perf_counter() - t0) from None
        except BaseException:
            self.claimed -= 1
            raise
        finally:
            if must_wait:
                o.waiting -= 1
        self.in_use += 1
        inst.acquire_duration.observe(time.perf_counter() - t0)
        return conn

    async def _driver_acquire(self) -> Any:
        o = self.owner
        if o.driver == "asyncpg":
            try:
                conn = await self.driver_pool.acquire()
            except asyncpg.exceptions.InterfaceError as exc:
                if "closed" in str(exc) or "closing" in str(exc):
                    raise PoolClosed(f"pool {o.name!r} is closed") from None
                raise
            conn._con._poolkit_idle_since = None
            return conn
        # A slot is free (the semaphore says so): psycopg only waits here while it opens a connection,
        # in its own worker, which logs and retries failures. Short waits let the first failure surface
        # at once (a wrong password should not look like a 10 s timeout).
        start = time.monotonic()
        deadline = start + o.settings.connect_timeout + 1.0
        while True:
            try:
                return await self.driver_pool.getconn(timeout=min(0.2, max(deadline - time.monotonic(), 0.01)))
            except PsycopgPoolTimeout:
                error = o.observer.recent_connect_error(within=time.monotonic() - start)
                if error is not None:
                    raise error from None
                if time.monotonic() < deadline:
                    continue
            raise ConnectTimeout(
                f"pool {o.name!r} could not open a connection to {o.dsn.host}:{o.dsn.port} within "
                f"connect_timeout={o.settings.connect_timeout:g}s; check the host and port, or raise "
                "POOLKIT_CONNECT_TIMEOUT",
                reason="timeout",
            ) from None

    async def release(self, conn: Any, exc: BaseException | None) -> None:
        o = self.owner
        self.in_use -= 1
        if o.driver == "asyncpg":
            try:
                raw = conn._con  # the proxy's connection: its slots are settable, the proxy's are not
                if raw is not None and not raw.is_closed():
                    raw._poolkit_idle_since = time.monotonic()
                    if raw._poolkit_idle_since - raw._poolkit_opened >= o.settings.max_lifetime:
                        raw._poolkit_close_reason = "lifetime"
                        await raw.close(timeout=5.0)
                await self.driver_pool.release(conn)
            finally:
                self.claimed -= 1
            return
        try:
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                # The psycopg_pool.connection() contract: commit on success, roll back on error.
                if exc is None:
                    await conn.commit()
                else:
                    await conn.rollback()
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


async def _reset_session(conn: Any) -> None:
    # asyncpg's default reset (RESET ALL, UNLISTEN, advisory unlocks), run past the timing wrapper: it is the
    # pool's statement, not the app's.
    query = conn.get_reset_query()
    if query:
        await asyncpg.Connection.execute(conn, query)


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
        await AsyncConnectionPool.check_connection(conn)


async def _rollback_only(conn: Any) -> None:
    # Behind a transaction pooler the session state that asyncpg's default RESET ALL clears cannot exist
    # (every transaction may land on another server), so that round trip per release is pure cost.
    # asyncpg has already rolled back an open transaction before calling this.
    return None


class Pool(PoolBase):
    """An async connection pool for asyncpg or psycopg, configured for where it connects.

    Use ``async with pool.acquire() as conn`` for the driver's own connection object, or the
    ``execute`` / ``fetch`` / ``fetchrow`` / ``fetchval`` shortcuts (placeholders are the driver's:
    ``$1`` for asyncpg, ``%s`` for psycopg).
    """

    def __init__(self, settings: Settings, *, route: Route = "pooled") -> None:
        self._bindings: dict[int, _Binding] = {}
        super().__init__(settings, route=route, driver=settings.driver)
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
        kwargs = detect.psycopg_connect_kwargs(
            self.dsn,
            self.mode,
            self.tls,
            application_name=self.settings.application_name,
            connect_timeout=self.settings.connect_timeout,
        )
        kwargs["cursor_factory"] = _ObservedAsyncCursor
        return kwargs

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
                },
            )
        return self._psycopg_class

    # -- the loop binding -------------------------------------------------------------------------------------

    async def _binding(self) -> _Binding:
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed: create a new one (or call poolkit.get_pool() again)")
        if self._pid != os.getpid():
            self._forget_after_fork()
        loop = asyncio.get_running_loop()
        binding = self._bindings.get(id(loop))
        if binding is not None and binding.loop is loop and not binding.closed:
            return binding
        return await self._bind(loop)

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
            await binding.open()
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

    def _forget_after_fork(self) -> None:
        """In a forked child: never touch the parent's sockets, start afresh lazily."""
        state = get_state()
        for binding in self._bindings.values():
            for fd in binding.sockets():
                _neutralise_fd(fd)
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
        row = await self.fetchrow(query, *args)
        return None if row is None else row[0]

    def _translated(self, exc: Exception) -> Exception:
        return translate_query_error(exc, self.mode, pool=self.name) or exc

    async def close(self, timeout: float = 10.0) -> None:
        """Let checked-out connections come back (up to ``timeout``), then close every connection."""
        self._closed = True
        for binding in list(self._bindings.values()):
            if binding.loop is asyncio.get_running_loop():
                await binding.close(timeout)
            elif binding.loop.is_running():
                fut = asyncio.run_coroutine_threadsafe(binding.close(timeout), binding.loop)
                await asyncio.wrap_future(fut)
        self._drop_dead_bindings()
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

    __slots__ = ("_binding", "_conn", "_pool", "_timeout")

    def __init__(self, pool: Pool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._binding: _Binding | None = None
        self._conn: Any = None

    async def __aenter__(self) -> Any:
        binding = await self._pool._binding()
        self._conn = await binding.acquire(self._timeout)
        self._binding = binding
        return self._conn

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        binding, conn = self._binding, self._conn
        self._binding = self._conn = None
        if binding is not None:
            await binding.release(conn, exc)


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
    *, driver: str | None = None, open: bool = True, settings: Settings | None = None, **overrides: Any
) -> Pool:
    """Create an async pool from the environment plus keyword overrides, and check it can connect.

    ``driver`` is ``"asyncpg"`` (default) or ``"psycopg"``. Every setting of :class:`poolkit.Settings`
    can be passed by keyword. With ``open=False`` nothing connects until the first acquire.
    """
    from poolkit.settings import load_settings  # noqa: PLC0415 - keeps import order simple for reloads

    if driver is not None:
        overrides["driver"] = driver
    cfg = settings if settings is not None and not overrides else load_settings(**overrides)
    pool = Pool(cfg)
    if open:
        try:
            await pool.open()
        except BaseException:
            await pool.close(timeout=1.0)
            raise
    return pool


__all__ = ["ConnectError", "Pool", "create_pool"]
