"""poolkit: serverless-safe PostgreSQL pools for asyncpg and psycopg, and a transaction-pooling sidecar.

The names below are imported on first use (PEP 562 module ``__getattr__``): ``import poolkit`` loads neither
driver, nor pydantic, nor prometheus-client, which a serverless function would pay for on every cold start
whether it uses them or not. ``poolkit.create_pool`` loads the settings, the pool and the one driver chosen.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from poolkit.errors import (
    AuthenticationFailed,
    CommitOutcomeUnknown,
    ConfigError,
    ConnectError,
    ConnectTimeout,
    DevStackError,
    IdempotencyConflict,
    PoolClosed,
    PoolkitError,
    PoolTimeout,
    PreparedStatementError,
    ProtocolError,
    SessionStateError,
    SidecarError,
    SSLError,
    TooManyConnections,
)

if TYPE_CHECKING:
    from poolkit.apps.migrate import direct, migration_url
    from poolkit.apps.provider import DatabaseProvider
    from poolkit.apps.provider import get_provider as get_provider  # public, though not in __all__ (as before)
    from poolkit.core.detect import Mode, detect_mode
    from poolkit.core.dsn import Dsn
    from poolkit.core.settings import Settings, load_settings
    from poolkit.dev.compare import compare
    from poolkit.pool.async_pool import Pool, create_pool
    from poolkit.pool.registry import get_pool, get_sync_pool
    from poolkit.pool.sync_pool import SyncPool, create_sync_pool

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_LAZY = {
    "compare": "poolkit.dev.compare",
    "Mode": "poolkit.core.detect",
    "detect_mode": "poolkit.core.detect",
    "Dsn": "poolkit.core.dsn",
    "direct": "poolkit.apps.migrate",
    "migration_url": "poolkit.apps.migrate",
    "Pool": "poolkit.pool.async_pool",
    "create_pool": "poolkit.pool.async_pool",
    "DatabaseProvider": "poolkit.apps.provider",
    "get_provider": "poolkit.apps.provider",
    "get_pool": "poolkit.pool.registry",
    "get_sync_pool": "poolkit.pool.registry",
    "Settings": "poolkit.core.settings",
    "load_settings": "poolkit.core.settings",
    "SyncPool": "poolkit.pool.sync_pool",
    "create_sync_pool": "poolkit.pool.sync_pool",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # Submodules (`poolkit.routing`, ...) are found by the import system, which asks here first.
        raise AttributeError(f"module 'poolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AuthenticationFailed",
    "CommitOutcomeUnknown",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "DatabaseProvider",
    "DevStackError",
    "Dsn",
    "IdempotencyConflict",
    "Mode",
    "Pool",
    "PoolClosed",
    "PoolTimeout",
    "PoolkitError",
    "PreparedStatementError",
    "ProtocolError",
    "SSLError",
    "SessionStateError",
    "Settings",
    "SidecarError",
    "SyncPool",
    "TooManyConnections",
    "__version__",
    "compare",
    "create_pool",
    "create_sync_pool",
    "detect_mode",
    "direct",
    "get_pool",
    "get_sync_pool",
    "load_settings",
    "migration_url",
]
