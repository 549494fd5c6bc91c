"""poolkit: serverless-safe PostgreSQL pools for asyncpg and psycopg, and a transaction-pooling sidecar."""

from __future__ import annotations

from poolkit.compare import compare
from poolkit.detect import Mode, detect_mode
from poolkit.dsn import Dsn
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
from poolkit.migrate import direct, migration_url
from poolkit.pool import Pool, create_pool
from poolkit.provider import DatabaseProvider, get_provider
from poolkit.registry import get_pool, get_sync_pool
from poolkit.settings import Settings, load_settings
from poolkit.sync_pool import SyncPool, create_sync_pool

__version__ = "0.1.0"

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
    "get_provider",
    "get_sync_pool",
    "load_settings",
    "migration_url",
]
