"""The async ``Pool``: one pool over asyncpg or psycopg-pool that is loop-, fork- and reload-safe.

What depends on the driver is behind its adapter (``poolkit.pool.driver``): a per-loop binding, an acquire context
manager and the query methods. This module keeps the bindings per event loop, the fork guard and the lifecycle.
"""

from __future__ import annotations

import asyncio
import os
from asyncio import get_running_loop
from collections.abc import Callable, Coroutine
from typing import Any

from poolkit.core.settings import Settings, load_settings
from poolkit.core.state import get_state
from poolkit.errors import ConnectError, PoolClosed
from poolkit.pool.base import ConnectionHooks, PoolBase, Route, neutralise_fd
from poolkit.pool.driver import Acquire, AsyncDriver, Binding, async_driver
from poolkit.pool.rls_async import UserSession
from poolkit.pool.shortcuts_async import AsyncShortcuts


class Pool(AsyncShortcuts, PoolBase):
    """An async connection pool for asyncpg or psycopg, configured for where it connects.

    Use ``async with pool.acquire() as conn`` for the driver's own connection object, or the
    ``execute`` / ``fetch`` / ``fetchrow`` / ``fetchval`` shortcuts (placeholders are the driver's:
    ``$1`` for asyncpg, ``%s`` for psycopg).
    """

    def __init__(self, settings: Settings, *, route: Route = "pooled", hooks: ConnectionHooks | None = None) -> None:
        self._bindings: dict[int, Binding] = {}
        self._hot: Binding | None = None
        super().__init__(settings, route=route, driver=settings.driver, hooks=hooks)
        #: The driver adapter (``poolkit.pool.driver.AsyncDriver``): the shortcuts, ``rls`` and ``money`` call it.
        self.adapter: AsyncDriver = async_driver(self.driver)
        self._acquire_type = self.adapter.acquire
        self._opening: dict[int, asyncio.Future[Binding]] = {}
        self._pid = os.getpid()

    # -- the loop binding -------------------------------------------------------------------------------------

    async def _binding(self) -> Binding:
        # The slow path of the driver's Acquire: the fast one reuses `_hot` when it belongs to the running loop. Forked
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

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> Binding:
        key = id(loop)
        pending = self._opening.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        self._drop_dead_bindings()
        future: asyncio.Future[Binding] = loop.create_future()
        self._opening[key] = future
        try:
            binding = self.adapter.binding(self, loop)
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
                        neutralise_fd(fd)
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
                neutralise_fd(fd)
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

    def acquire(self, *, timeout: float | None = None) -> Acquire:
        """``async with pool.acquire() as conn``: a connection, or PoolTimeout after ``acquire_timeout``."""
        return self._acquire_type(self, timeout)

    def connection(self, timeout: float | None = None) -> Acquire:
        """``async with pool.connection() as conn``: psycopg_pool's name for :meth:`acquire`, same behaviour.

        With psycopg the block commits on success and rolls back on error, as psycopg_pool's does.
        """
        return self._acquire_type(self, timeout)

    def as_user(self, claims: Any, *, role: str | None = "authenticated") -> UserSession:
        """``async with pool.as_user(claims) as conn``: a transaction under RLS claims and role (poolkit.rls)."""
        return UserSession(self, claims, role)

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

    def retire(self) -> None:
        """Close this pool for a registry that replaces it, without blocking or awaiting.

        On a running loop the close is a task (kept referenced until done); without one the pool is marked
        closed, and bindings whose loops died are dropped (their connections end with their sockets).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            state = get_state()
            task = loop.create_task(self.close())
            state.inherited.append(task)  # a strong reference until it is done
            task.add_done_callback(state.inherited.remove)
            return
        self._closed = True
        self._hot = None
        self._drop_dead_bindings()

    def gauge_values(self) -> tuple[int, int, int, int, int]:
        in_use = idle = 0
        for binding in list(self._bindings.values()):
            in_use += binding.in_use
            idle += binding.idle_and_size()[0]
        return in_use, idle, self.max_size, self.settings.min_size, self.waiting


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
    :class:`poolkit.pool.base.ConnectionHooks`.
    """
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
