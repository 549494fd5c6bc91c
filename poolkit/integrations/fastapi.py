"""FastAPI/Starlette fit: a lifespan that opens the pool on startup and drains it on shutdown, and a dependency."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import Request

from poolkit.errors import ConfigError
from poolkit.pool.async_pool import Pool, create_pool

STATE_NAME = "pool"


def lifespan(
    *, drain_timeout: float = 10.0, **overrides: Any
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan for ``FastAPI(lifespan=...)`` or ``Starlette(lifespan=...)``.

    On startup it creates the pool from the environment plus ``overrides`` (any :class:`poolkit.Settings`
    field, e.g. ``driver="psycopg"``) and opens one connection, so a wrong URL stops the app from
    starting instead of failing its first request. The pool is put on ``app.state.pool`` and in the
    lifespan state (``request.state.pool``). On shutdown it waits up to ``drain_timeout`` seconds for
    requests still holding connections, then closes every connection.
    """

    @asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        pool = await create_pool(**overrides)
        app.state.pool = pool
        try:
            yield {STATE_NAME: pool}
        finally:
            await pool.close(timeout=drain_timeout)

    return _lifespan


def get_pool(request: Request) -> Pool:
    """The app's pool, for ``Depends(get_pool)`` (or use :data:`PoolDep`)."""
    pool = getattr(request.app.state, STATE_NAME, None)
    if not isinstance(pool, Pool):
        raise ConfigError(
            "no poolkit pool on app.state: create the app with FastAPI(lifespan=poolkit.integrations.fastapi."
            "lifespan())"
        )
    return pool


PoolDep = Annotated[Pool, Depends(get_pool)]
"""``async def handler(pool: PoolDep)``: the app's pool, injected by FastAPI."""

__all__ = ["PoolDep", "get_pool", "lifespan"]
