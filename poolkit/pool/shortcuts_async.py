"""The query shortcuts every pool has: ``execute``, ``fetch``, ``fetchrow``, ``fetchval``.

``shortcuts_async.py`` is the source and ``shortcuts_sync.py`` is generated from it by ``scripts/async_to_sync``:
the async ``Pool`` and the sync ``SyncPool`` get the same shortcuts, with the same error translation, by
construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from poolkit.core.detect import Mode
from poolkit.core.translate import translate_query_error


class AsyncQueries(Protocol):
    """The driver's side of the shortcuts (``poolkit.pool.driver.AsyncDriver``, ``poolkit.pool.psycopg_sync``)."""

    def execute(self, conn: Any, query: Any, args: Sequence[Any], timeout: float | None) -> Any: ...
    def fetch(self, conn: Any, query: Any, args: Sequence[Any]) -> Any: ...
    def fetchrow(self, conn: Any, query: Any, args: Sequence[Any]) -> Any: ...
    def fetchval(self, conn: Any, query: Any, args: Sequence[Any]) -> Any: ...


class AsyncShortcuts:
    """One statement on a connection of the pool, driver errors translated into poolkit's (with a hint).

    Placeholders are the driver's own: ``$1`` for asyncpg, ``%s`` for psycopg.
    """

    name: str
    mode: Mode
    adapter: AsyncQueries

    def acquire(self, *, timeout: float | None = None) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def execute(self, query: Any, *args: Any, timeout: float | None = None) -> str:
        """Run a statement; return its status tag (e.g. ``INSERT 0 1``).

        ``timeout`` is asyncpg's per-statement timeout in seconds; psycopg has no such argument and ignores it.
        """
        async with self.acquire() as conn:
            try:
                status: str = await self.adapter.execute(conn, query, args, timeout)
            except Exception as exc:
                raise self._translated(exc) from exc
            return status

    async def fetch(self, query: Any, *args: Any) -> list[Any]:
        """All rows (asyncpg Records, psycopg tuples)."""
        async with self.acquire() as conn:
            try:
                rows: list[Any] = await self.adapter.fetch(conn, query, args)
            except Exception as exc:
                raise self._translated(exc) from exc
            return rows

    async def fetchrow(self, query: Any, *args: Any) -> Any:
        """The first row, or None."""
        async with self.acquire() as conn:
            try:
                return await self.adapter.fetchrow(conn, query, args)
            except Exception as exc:
                raise self._translated(exc) from exc

    async def fetchval(self, query: Any, *args: Any) -> Any:
        """The first column of the first row, or None."""
        async with self.acquire() as conn:
            try:
                return await self.adapter.fetchval(conn, query, args)
            except Exception as exc:
                raise self._translated(exc) from exc

    def _translated(self, exc: Exception) -> Exception:
        return translate_query_error(exc, self.mode, pool=self.name) or exc
