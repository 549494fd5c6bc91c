"""The process-wide pools behind ``get_pool()``: one per settings, surviving reloads, forks and new loops."""

from __future__ import annotations

import threading
from typing import Any

from poolkit.core.settings import load_settings
from poolkit.core.state import get_state
from poolkit.pool.async_pool import Pool
from poolkit.pool.base import install_fork_hook
from poolkit.pool.sync_pool import SyncPool

_lock = threading.Lock()


def _get(kind: str, factory: type[Pool] | type[SyncPool], overrides: dict[str, Any]) -> Any:
    install_fork_hook()
    settings = load_settings(**overrides)
    slot = (kind, settings.name)
    key = settings.key()
    state = get_state()
    with _lock:
        entry = state.registry.get(slot)
        if entry is not None:
            old_key, old_pool = entry
            if old_key == key and not old_pool.closed:
                return old_pool
            if not old_pool.closed:
                old_pool.retire()  # drained and closed without blocking this caller
        pool = factory(settings)
        state.registry[slot] = (key, pool)
        return pool


def get_pool(**overrides: Any) -> Pool:
    """The process-wide async pool for these settings (environment plus keyword overrides).

    The same object comes back on every call, across ``importlib.reload`` of your modules or poolkit's,
    in every event loop (each ``asyncio.run()`` gets working connections, closed when that loop ends) and
    in forked children (which open their own connections). Settings that changed give a new pool; the old
    one is drained and closed. Nothing connects until the first query.
    """
    pool: Pool = _get("async", Pool, overrides)
    return pool


def get_sync_pool(**overrides: Any) -> SyncPool:
    """The process-wide sync psycopg pool for these settings; see :func:`get_pool`."""
    overrides.setdefault("driver", "psycopg")
    pool: SyncPool = _get("sync", SyncPool, overrides)
    return pool


def forget_pools() -> None:
    """Drop every registered pool without closing it (tests, or after closing them yourself)."""
    with _lock:
        get_state().registry.clear()
