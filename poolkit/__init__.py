"""poolkit: serverless-safe PostgreSQL pools for asyncpg and psycopg, and a transaction-pooling sidecar.

The names below are imported on first use (PEP 562 module ``__getattr__``): ``import poolkit`` loads neither
driver, nor pydantic, nor prometheus-client, which a serverless function would pay for on every cold start
whether it uses them or not. ``poolkit.create_pool`` loads the settings, the pool and the one driver chosen.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Eager: `compare` is also the name of its submodule, and an import of `poolkit.compare` made before the first
# access would otherwise leave the module, not the function, as `poolkit.compare`. The module is light.
from poolkit.compare import compare
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
    from poolkit.detect import Mode, detect_mode
    from poolkit.dsn import Dsn
    from poolkit.migrate import direct, migration_url
    from poolkit.pool import Pool, create_pool
    from poolkit.provider import DatabaseProvider
    from poolkit.provider import get_provider as get_provider  # public, though not in __all__ (as before)
    from poolkit.registry import get_pool, get_sync_pool
    from poolkit.settings import Settings, load_settings
    from poolkit.sync_pool import SyncPool, create_sync_pool

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_LAZY = {
    "Mode": "poolkit.detect",
    "detect_mode": "poolkit.detect",
    "Dsn": "poolkit.dsn",
    "direct": "poolkit.migrate",
    "migration_url": "poolkit.migrate",
    "Pool": "poolkit.pool",
    "create_pool": "poolkit.pool",
    "DatabaseProvider": "poolkit.provider",
    "get_provider": "poolkit.provider",
    "get_pool": "poolkit.registry",
    "get_sync_pool": "poolkit.registry",
    "Settings": "poolkit.settings",
    "load_settings": "poolkit.settings",
    "SyncPool": "poolkit.sync_pool",
    "create_sync_pool": "poolkit.sync_pool",
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
