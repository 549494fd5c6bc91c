"""``DatabaseProvider``: an asyncpg pool and a psycopg pool side by side, each created on first use."""

from __future__ import annotations

import asyncio
from typing import Any

from poolkit.core.settings import Settings, load_settings
from poolkit.pool.async_pool import Pool


class DatabaseProvider:
    """Both async drivers behind one object, for apps that use asyncpg and a psycopg-based library together.

    ``await provider.asyncpg()`` / ``await provider.psycopg()`` return the same pool on every call;
    ``await provider.disconnect()`` closes both; ``provider.reset()`` forgets both (after a fork, or in tests).
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self._settings = settings
        self._overrides = overrides
        self._pools: dict[str, Pool] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def settings(self, driver: str) -> Settings:
        base = self._settings
        if base is None:
            return load_settings(**self._overrides, driver=driver)
        return load_settings(**{**base.model_dump(), **self._overrides, "driver": driver})

    async def _get(self, driver: str) -> Pool:
        pool = self._pools.get(driver)
        if pool is not None and not pool.closed:
            return pool
        lock = self._locks.setdefault(driver, asyncio.Lock())
        async with lock:
            pool = self._pools.get(driver)
            if pool is None or pool.closed:
                pool = Pool(self.settings(driver))
                self._pools[driver] = pool
            return pool

    async def asyncpg(self) -> Pool:
        """The asyncpg pool, created on first use."""
        return await self._get("asyncpg")

    async def psycopg(self) -> Pool:
        """The psycopg async pool, created on first use."""
        return await self._get("psycopg")

    async def disconnect(self, timeout: float = 10.0) -> None:
        """Close both pools (waiting up to ``timeout`` for connections in use)."""
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.close(timeout) for p in pools))

    def reset(self) -> None:
        """Forget both pools without closing them; the next call creates new ones."""
        self._pools = {}
        self._locks = {}

    def __repr__(self) -> str:
        inner = " ".join(f"{d}={p!r}" for d, p in self._pools.items()) or "empty"
        return f"<DatabaseProvider {inner}>"


_default: DatabaseProvider | None = None


def get_provider() -> DatabaseProvider:
    """The process-wide provider (the same instance on every call)."""
    global _default  # noqa: PLW0603 - one provider per process is the point
    from poolkit.core.state import get_state  # noqa: PLC0415

    state = get_state()
    provider = state.registry.get(("provider",))
    if provider is None:
        provider = state.registry[("provider",)] = DatabaseProvider()
    _default = provider
    return provider
