"""The psycopg driver of the async ``Pool``: psycopg_pool's AsyncConnectionPool behind poolkit's waiting queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from time import perf_counter
from typing import Any, cast

from poolkit.pool import psycopg_async
from poolkit.pool.base import PoolBase
from poolkit.pool.driver import Acquire, AsyncDriver, Binding, PoolServices, Transaction

_get_running_loop = asyncio.get_running_loop


class PsycopgBinding(Binding):
    """The psycopg_pool pool of one event loop, and the semaphore its callers wait on (in arrival order)."""

    def __init__(self, owner: PoolServices, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(owner, loop)
        # poolkit's own queue in front of psycopg_pool's: cheaper than psycopg_pool's timed wait, and it
        # enforces max_waiting (callers waiting inside psycopg_pool are only those whose connection opens).
        self.sem = asyncio.Semaphore(owner.max_size)

    async def open_driver_pool(self) -> None:
        owner = cast(PoolBase, self.owner)  # the Pool: a PoolBase, seen here through the services a binding uses
        cls = psycopg_async.connection_class(owner, None)
        # configure: the app's hook runs inside _configure, after poolkit's own set-up.
        self.driver_pool = await psycopg_async.open_pool(owner, cls, self._configure)

    async def _configure(self, conn: Any) -> None:
        # Per connection, not on the per-pool class: each event loop's binding has its own Recorder.
        conn._poolkit_rec = self.recorder
        configure = self.owner.hooks.configure
        if configure is not None:
            await configure(conn)

    async def close_driver_pool(self, timeout: float) -> None:
        await self.driver_pool.close(timeout=timeout)

    def idle_and_size(self) -> tuple[int, int]:
        return psycopg_async.idle_and_size(self.driver_pool)

    def sockets(self) -> list[int]:
        return [conn.pgconn.socket for conn in psycopg_async.open_connections(self.driver_pool)]


class PsycopgAcquire(Acquire):
    """A slot from the binding's semaphore (with the pool's acquire timeout), then a connection from psycopg_pool."""

    __slots__ = ()

    async def __aenter__(self) -> Any:
        pool = self._pool
        binding: Any = pool._hot
        if binding is None or binding.loop is not _get_running_loop() or binding.closed:
            binding = await pool._binding()
        sem = binding.sem
        t0 = perf_counter()
        if sem.locked():
            if binding.max_waiting and pool.waiting >= binding.max_waiting:
                raise pool.too_many_waiting()
            limit = pool.settings.acquire_timeout if self._timeout is None else self._timeout
            binding.tally.waited()
            pool.waiting += 1
            deadlines = binding.deadlines
            task = deadlines.add(self, limit)
            try:
                await sem.acquire()
            except asyncio.CancelledError:
                if self.expired and task is not None and task.uncancel() <= self.cancelling:
                    binding.tally.acquired(perf_counter() - t0)
                    raise pool.exhausted(limit) from None
                raise
            finally:
                pool.waiting -= 1
                self.task = None
                deadlines.done()
            if self.expired and task is not None:
                task.uncancel()  # served at the deadline: the cancel request never reached the task
        else:
            await sem.acquire()
        try:
            conn = await psycopg_async.getconn(binding.driver_pool, cast(PoolBase, pool), perf_counter() - t0)
        except BaseException:
            sem.release()
            raise
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
            await psycopg_async.give_back(binding.driver_pool, conn, exc)
        finally:
            binding.sem.release()


class PsycopgDriver(AsyncDriver):
    """psycopg 3: ``%s`` placeholders, statements through a cursor, transactions begun by the first statement."""

    name = "psycopg"
    binding = PsycopgBinding
    acquire = PsycopgAcquire

    def sql(self, text: str) -> str:
        return psycopg_async.sql(text)

    def execute(self, conn: Any, query: Any, args: Sequence[Any], timeout: float | None) -> Awaitable[str]:
        return psycopg_async.execute(conn, query, args, timeout)

    def fetch(self, conn: Any, query: Any, args: Sequence[Any]) -> Awaitable[list[Any]]:
        return psycopg_async.fetch(conn, query, args)

    def fetchrow(self, conn: Any, query: Any, args: Sequence[Any]) -> Awaitable[Any]:
        return psycopg_async.fetchrow(conn, query, args)

    def fetchval(self, conn: Any, query: Any, args: Sequence[Any]) -> Awaitable[Any]:
        return psycopg_async.fetchval(conn, query, args)

    async def begin(self, conn: Any, isolation: str | None = None) -> Transaction:
        return await psycopg_async.begin(conn, isolation)


DRIVER = PsycopgDriver()
