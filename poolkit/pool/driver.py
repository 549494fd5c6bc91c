"""The driver-adapter interface of the async ``Pool``: what it asks of asyncpg or psycopg, one class per driver.

A pool never checks which driver it has: it calls its :class:`AsyncDriver` (``pool.adapter``), and the
binding and acquire classes the driver supplies. ``poolkit.pool.driver_asyncpg`` and ``poolkit.pool.driver_psycopg``
implement it; :func:`async_driver` imports only the one a pool uses, so an asyncpg app never loads psycopg
and a psycopg app never loads asyncpg. The sync pool is psycopg only: it uses ``poolkit.pool.psycopg_sync``.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from poolkit.errors import ConfigError
from poolkit.pool.deadlines import Deadlines, Waiter

if TYPE_CHECKING:
    from poolkit.core.detect import Mode, TlsConfig
    from poolkit.core.dsn import Dsn
    from poolkit.core.settings import Settings
    from poolkit.errors import PoolTimeout, TooManyWaiting
    from poolkit.obs.observe import Observer
    from poolkit.pool.base import ConnectionHooks, SessionGuard

# The driver name (settings.driver) -> the module whose DRIVER implements it.
_MODULES = {"asyncpg": "poolkit.pool.driver_asyncpg", "psycopg": "poolkit.pool.driver_psycopg"}


class PoolServices(Protocol):
    """What a binding and an acquire need of their pool (the async ``Pool`` provides it)."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def max_size(self) -> int: ...
    @property
    def max_waiting(self) -> int: ...
    @property
    def mode(self) -> Mode: ...
    @property
    def dsn(self) -> Dsn: ...
    @property
    def tls(self) -> TlsConfig: ...
    @property
    def guard(self) -> SessionGuard: ...
    @property
    def hooks(self) -> ConnectionHooks: ...
    @property
    def observer(self) -> Observer: ...

    waiting: int
    #: The binding of the event loop used last: the acquire fast path reuses it without a dict lookup.
    _hot: Binding | None

    async def _binding(self) -> Binding: ...
    def exhausted(self, limit: float) -> PoolTimeout: ...
    def too_many_waiting(self) -> TooManyWaiting: ...
    def psycopg_kwargs(self, cursor_factory: type[Any]) -> dict[str, Any]: ...


class Binding:
    """A pool's driver pool on one event loop: asyncio objects belong to the loop that made them.

    Subclasses (one per driver) open and close the driver pool and say what is in it; the acquire path is
    the driver's :class:`Acquire`, which reads and writes the counters here.
    """

    def __init__(self, owner: PoolServices, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.max_size = owner.max_size
        self.in_use = 0
        self.closed = False
        self.driver_pool: Any = None
        self.guard: AsyncGenerator[None, None] | None = None
        self.max_waiting = owner.max_waiting
        self.max_lifetime = owner.settings.max_lifetime
        self.recorder = owner.observer.recorder()
        self.tally = self.recorder.tally
        self.deadlines = Deadlines(loop)

    async def open(self) -> None:
        """Open the driver pool, and close it when the loop ends."""
        await self.open_driver_pool()
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

    async def close(self, timeout: float) -> None:
        """Let checked-out connections come back (up to ``timeout``), then close the driver pool."""
        if self.closed:
            return
        self.closed = True
        self.deadlines.cancel()
        self.owner.observer.closing = True
        if self.driver_pool is not None:
            await self.close_driver_pool(timeout)

    async def open_driver_pool(self) -> None:
        """Create ``driver_pool`` for this loop."""
        raise NotImplementedError

    async def close_driver_pool(self, timeout: float) -> None:
        raise NotImplementedError

    def idle_and_size(self) -> tuple[int, int]:
        """(idle connections, open connections) of the driver pool."""
        raise NotImplementedError

    def sockets(self) -> list[int]:
        """File descriptors of every open connection (for the fork guard)."""
        raise NotImplementedError


class Acquire(Waiter):
    """``async with pool.acquire()``: a class rather than @asynccontextmanager, it is on every query's path.

    Each driver subclasses it with its own ``__aenter__``/``__aexit__``; while it waits for a connection the
    object is its own :class:`~poolkit.pool.deadlines.Waiter` record.
    """

    __slots__ = ("_binding", "_conn", "_pool", "_timeout")

    def __init__(self, pool: PoolServices, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._binding: Any = None
        self._conn: Any = None

    async def __aenter__(self) -> Any:
        raise NotImplementedError

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        raise NotImplementedError


class Transaction(Protocol):
    """A transaction on a driver's connection (:meth:`AsyncDriver.begin`)."""

    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...


class AsyncDriver:
    """One driver, as the async pool and the application helpers (``rls``, ``money``) use it.

    The query methods take the driver's connection, the statement (in the driver's placeholder style:
    :meth:`sql` converts poolkit's own ``$n`` statements) and the arguments as a sequence; they return an
    awaitable, which for asyncpg is the driver's own coroutine (no extra frame on the shortcuts' path).
    """

    name: ClassVar[str]
    binding: ClassVar[type[Binding]]
    acquire: ClassVar[type[Acquire]]

    def sql(self, text: str) -> str:
        """poolkit's own statement ``text``, numbered ``$n`` in argument order, in this driver's style."""
        raise NotImplementedError

    def execute(self, conn: Any, query: Any, args: Sequence[Any], timeout: float | None) -> Awaitable[str]:
        """Run a statement; its status tag. ``timeout`` is asyncpg's per-statement one (psycopg: ignored)."""
        raise NotImplementedError

    def fetch(self, conn: Any, query: Any, args: Sequence[Any]) -> Awaitable[list[Any]]:
        raise NotImplementedError

    def fetchrow(self, conn: Any, query: Any, args: Sequence[Any]) -> Awaitable[Any]:
        raise NotImplementedError

    def fetchval(self, conn: Any, query: Any, args: Sequence[Any]) -> Awaitable[Any]:
        raise NotImplementedError

    async def begin(self, conn: Any, isolation: str | None = None) -> Transaction:
        """Begin a transaction on ``conn`` (``isolation``: ``read_committed``, ``repeatable_read``, ...)."""
        raise NotImplementedError


def async_driver(name: str) -> AsyncDriver:
    """The adapter of driver ``name``, importing that driver (and only it) on first use."""
    module = _MODULES.get(name)
    if module is None:
        raise ConfigError(f"driver={name!r} is not supported: use 'asyncpg' or 'psycopg' (POOLKIT_DRIVER)")
    driver: AsyncDriver = importlib.import_module(module).DRIVER
    return driver


ISOLATION_SQL = {
    "read_committed": "READ COMMITTED",
    "repeatable_read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}


__all__ = ["ISOLATION_SQL", "Acquire", "AsyncDriver", "Binding", "PoolServices", "Transaction", "async_driver"]
