"""What migration and introspection tools connect to: the direct URL (``migration_url``) and pool (``direct``)."""

from __future__ import annotations

from typing import Any, Literal

from poolkit.core import detect
from poolkit.core.detect import Mode
from poolkit.core.dsn import Dsn
from poolkit.core.settings import Settings, load_settings
from poolkit.errors import ConfigError
from poolkit.pool.async_pool import Pool
from poolkit.pool.registry import get_pool

UrlDriver = Literal["asyncpg", "psycopg"]

_SCHEMES: dict[str, str] = {"asyncpg": "postgresql+asyncpg", "psycopg": "postgresql+psycopg"}

_NO_DIRECT_URL = (
    "the pooled URL is a transaction pooler ({reason}) and no direct URL is configured: migration and "
    "introspection tools need full sessions. Set POOLKIT_DIRECT_URL (or DIRECT_DATABASE_URL / "
    "POSTGRES_URL_NON_POOLING) to the database's direct address (Supabase: port 5432)"
)


def direct_dsn_for_tools(settings: Settings) -> Dsn:
    """The URL tools must use: the direct URL, or the pooled one when it is not a transaction pooler.

    Raises :class:`~poolkit.errors.ConfigError` naming ``POOLKIT_DIRECT_URL`` when only a
    transaction pooler is configured.
    """
    direct = settings.direct_dsn()
    if direct is not None:
        return direct
    pooled = settings.pooled_dsn()
    detection = detect.detect_mode(pooled, settings.pool_mode)
    if detection.mode is Mode.TRANSACTION:
        raise ConfigError(_NO_DIRECT_URL.format(reason=detection.reason))
    return pooled


def tool_dsn(dsn: Dsn, settings: Settings, driver: str | None) -> Dsn:
    """``dsn`` without tool-only parameters, with the TLS settings spelled for ``driver``.

    libpq and psycopg read ``sslmode`` / ``sslrootcert``; SQLAlchemy hands asyncpg the URL's query
    as keyword arguments, and asyncpg's keyword is ``ssl`` (it takes libpq's mode names).
    """
    tls = detect.tls_config(dsn, settings.sslmode, settings.sslrootcert)
    clean = dsn.without_params(*detect.TOOL_ONLY_PARAMS, "ssl")
    if driver == "asyncpg":
        # asyncpg takes the CA file only from its own dsn parsing or PGSSLROOTCERT, not as a keyword.
        return clean.with_params(ssl=tls.sslmode)
    return clean.with_params(**tls.libpq_params())


def migration_url(*, driver: UrlDriver | None = None, **overrides: Any) -> str:
    """The direct URL for migration and introspection tools (Alembic, pg_dump, psql, Prisma migrate).

    The URL **contains the password**: tools need it to connect. Hand it to the tool; never log or
    print it (``poolkit.Dsn.parse(url).redacted()`` shows it safely).

    ``driver=None`` gives a libpq URL (``postgresql://…?sslmode=…&sslrootcert=…``); ``"asyncpg"`` or
    ``"psycopg"`` gives a SQLAlchemy URL (``postgresql+asyncpg://…?ssl=…`` /
    ``postgresql+psycopg://…?sslmode=…``). Tool-only parameters (``pgbouncer``, ``connection_limit``,
    …) are removed. For asyncpg with ``verify-ca``/``verify-full``, asyncpg reads the CA file from
    ``PGSSLROOTCERT``; ``poolkit.sqlalchemy.migration_engine()`` passes it for you.

    Without a direct URL, the pooled URL is returned when it is not a transaction pooler; otherwise
    :class:`~poolkit.errors.ConfigError` says to set ``POOLKIT_DIRECT_URL``. Settings come from the
    environment plus keyword ``overrides`` (as for ``create_pool``).
    """
    if driver is not None and driver not in _SCHEMES:
        raise ConfigError(f"driver={driver!r}: use 'asyncpg', 'psycopg' or None (a plain libpq URL)")
    settings = load_settings(**overrides)
    url = tool_dsn(direct_dsn_for_tools(settings), settings, driver).to_url()
    if driver is None:
        return url
    return _SCHEMES[driver] + url.removeprefix("postgresql")


def direct(**overrides: Any) -> Pool:
    """The process-wide async pool on the direct URL: ``poolkit.get_pool(**overrides).direct()``.

    Use it for explicit direct work (DDL, introspection, session features); it shares the
    lifecycle of :func:`poolkit.get_pool` (reloads, forks, event loops).
    """
    return get_pool(**overrides).direct()
