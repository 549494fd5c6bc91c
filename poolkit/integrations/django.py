"""Django fit: a ``DATABASES`` dict for the pooled URL (psycopg pool, no server-side cursors) and a direct alias."""

from __future__ import annotations

from typing import Any

from poolkit.core import detect
from poolkit.core.detect import Mode
from poolkit.core.dsn import Dsn
from poolkit.core.settings import Settings, load_settings


def _entry(dsn: Dsn, settings: Settings, mode: Mode, *, pooled: bool) -> dict[str, Any]:
    tls = detect.tls_config(dsn, settings.sslmode, settings.sslrootcert)
    options: dict[str, Any] = {
        **dsn.without_params(*detect.TOOL_ONLY_PARAMS).query,
        **tls.libpq_params(),
        "application_name": settings.application_name,
        "connect_timeout": max(2, round(settings.connect_timeout)),
    }
    if mode is Mode.TRANSACTION:
        # Django already defaults to None with psycopg 3; pinned here so an OPTIONS edit cannot turn
        # named prepared statements on behind a transaction pooler.
        options["prepare_threshold"] = None
    if pooled:
        options["pool"] = {
            "min_size": settings.min_size,
            "max_size": settings.max_size,
            "timeout": settings.acquire_timeout,
            "max_idle": settings.idle_timeout,
            "max_lifetime": settings.max_lifetime,
        }
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": dsn.database,
        "USER": dsn.user,
        "PASSWORD": dsn.password or "",
        "HOST": dsn.host,
        "PORT": str(dsn.port),
        "OPTIONS": options,
        # Django refuses CONN_MAX_AGE != 0 with a pool: the pool keeps the connections instead.
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": False,
        # A server-side cursor is session state (DECLARE ... WITH HOLD); through a transaction pooler
        # its FETCH can reach another server connection, where the cursor does not exist.
        "DISABLE_SERVER_SIDE_CURSORS": mode is Mode.TRANSACTION,
    }


def databases(
    *, alias: str = "default", direct_alias: str = "direct", settings: Settings | None = None, **overrides: Any
) -> dict[str, dict[str, Any]]:
    """``DATABASES = databases()`` for a Django project on Supabase or behind PgBouncer.

    ``alias`` uses the pooled URL with Django's psycopg pool (``OPTIONS["pool"]`` sized from
    POOLKIT_MAX_SIZE & co.), and — when poolkit detects a transaction pooler — server-side cursors off
    and ``prepare_threshold=None``. When a direct URL is configured, ``direct_alias`` points at it
    (no pool, a test mirror of ``alias``): run ``manage.py migrate --database direct``.
    ``settings``/``overrides`` work as for :func:`poolkit.create_pool`.
    """
    cfg = settings if settings is not None else load_settings(**overrides)
    pooled_dsn = cfg.pooled_dsn()
    mode = detect.detect_mode(pooled_dsn, cfg.pool_mode).mode
    result = {alias: _entry(pooled_dsn, cfg, mode, pooled=True)}
    direct_dsn = cfg.direct_dsn()
    if direct_dsn is not None:
        direct = _entry(direct_dsn, cfg, Mode.DIRECT, pooled=False)
        direct["TEST"] = {"MIRROR": alias}
        result[direct_alias] = direct
    return result


__all__ = ["databases"]
