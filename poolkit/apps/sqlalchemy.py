"""SQLAlchemy engine factories configured for where they connect: the pooled URL (transaction pooler) or the direct one.

Through a transaction pooler every transaction may run on another server connection, so nothing may
depend on a named prepared statement surviving:

* asyncpg: ``statement_cache_size=0`` (asyncpg) and ``prepared_statement_cache_size=0`` (SQLAlchemy's
  own cache of prepared statements; SQLAlchemy's defaults, 100 each, fail through PgBouncer with
  ``prepared statement "__asyncpg_stmt_13__" does not exist`` and, across processes, ``... already
  exists`` — tests/test_sqlalchemy.py and tests/test_alembic.py show both). SQLAlchemy's dialect still
  prepares every statement with ``Connection.prepare()``, which names it ``__asyncpg_stmt_<n>__`` from a
  per-process counter; with the caches at 0 asyncpg closes each one before the connection's next
  statement, which was enough in every test here, so SQLAlchemy's suggested uuid names are not needed.
  poolkit goes one step further and asks for the name ``""``, PostgreSQL's *unnamed* statement, which
  the next Parse replaces: a statement whose Close never got sent (a cancelled task, a dropped
  connection) then cannot linger on a pooler's server connection and collide with another process's
  ``__asyncpg_stmt_1__``. It costs nothing: the same messages, minus the Close.
* psycopg: ``prepare_threshold=None`` (never prepare server-side).

Pooling: with ``profile="serverless"`` (the default) the engine uses ``NullPool``: the transaction
pooler is the pool, and a frozen serverless instance must not hold sockets that die while it sleeps.
With ``profile="server"`` a small queue pool (``max_size`` connections, no overflow,
``pool_pre_ping``, recycled after ``max_lifetime``): ``QueuePool`` for a sync engine,
``AsyncAdaptedQueuePool`` for an async one (SQLAlchemy refuses ``QueuePool`` there). TLS follows the
settings (``sslmode``, ``sslrootcert``), as for poolkit's own pools.

The factories take poolkit's settings as keywords (``create_async_engine(max_size=3, profile="server")``),
as ``poolkit.create_pool`` does; every other keyword goes to SQLAlchemy.
"""

from __future__ import annotations

from typing import Any, Literal

try:
    import sqlalchemy
    from sqlalchemy.engine import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.ext.asyncio import create_async_engine as _sa_create_async_engine
    from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, QueuePool
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    from poolkit.errors import ConfigError

    raise ConfigError(
        "poolkit.sqlalchemy needs SQLAlchemy: pip install 'poolkit[sqlalchemy]' (sqlalchemy[asyncio], alembic)"
    ) from exc

from poolkit.apps.migrate import direct_dsn_for_tools
from poolkit.core import detect
from poolkit.core.detect import Mode
from poolkit.core.dsn import Dsn
from poolkit.core.settings import Settings, load_settings
from poolkit.errors import ConfigError

__all__ = ["create_async_engine", "create_engine", "engine_options", "migration_engine"]

Driver = Literal["asyncpg", "psycopg"]
EngineRoute = Literal["pooled", "direct"]


def _unnamed_statement() -> str:
    # asyncpg treats a str name as given: "" is PostgreSQL's unnamed statement (see the module docstring).
    return ""


def _target(settings: Settings, route: EngineRoute) -> tuple[Dsn, Mode]:
    if route == "direct":
        return direct_dsn_for_tools(settings), Mode.DIRECT
    if route != "pooled":
        raise ConfigError(f"route={route!r}: use 'pooled' (the app's queries) or 'direct' (migrations, DDL)")
    dsn = settings.pooled_dsn()
    return dsn, detect.detect_mode(dsn, settings.pool_mode).mode


def _settings(settings: Settings | None, engine_kwargs: dict[str, Any]) -> Settings | None:
    """Move poolkit's settings out of ``engine_kwargs`` (the rest is SQLAlchemy's) and apply them."""
    ours = {k: engine_kwargs.pop(k) for k in list(engine_kwargs) if k in Settings.model_fields and k != "driver"}
    if not ours:
        return settings
    if settings is None:
        return load_settings(**ours)
    return load_settings(**{**settings.model_dump(), **ours})


def engine_options(
    *,
    driver: Driver = "asyncpg",
    route: EngineRoute = "pooled",
    settings: Settings | None = None,
    asynchronous: bool | None = None,
) -> tuple[URL, dict[str, Any]]:
    """The SQLAlchemy URL and ``create_engine`` keyword arguments poolkit would use (for custom setups).

    ``asynchronous`` picks the server profile's pool class: ``AsyncAdaptedQueuePool`` for
    ``create_async_engine``, ``QueuePool`` for ``create_engine``; by default async for asyncpg.
    The URL object carries the password (SQLAlchemy masks it in ``repr``; ``render_as_string()``
    without ``hide_password=False`` does too).
    """
    if driver not in ("asyncpg", "psycopg"):
        raise ConfigError(f"driver={driver!r}: use 'asyncpg' or 'psycopg'")
    cfg = settings or load_settings()
    dsn, mode = _target(cfg, route)
    tls = detect.tls_config(dsn, cfg.sslmode, cfg.sslrootcert)
    query = dsn.without_params(*detect.TOOL_ONLY_PARAMS, "ssl").query
    transaction = not detect.prepared_statements_allowed(mode)
    connect_args: dict[str, Any]
    if driver == "asyncpg":
        server_settings = {"application_name": cfg.application_name}
        server_settings.update({k: v for k, v in query.items() if k not in ("options", "target_session_attrs")})
        query = {}
        connect_args = {
            "ssl": tls.ssl_context(),
            "timeout": cfg.connect_timeout,
            "server_settings": server_settings,
            **detect.asyncpg_statement_options(mode),
        }
        if transaction:
            connect_args["prepared_statement_cache_size"] = 0
            connect_args["prepared_statement_name_func"] = _unnamed_statement
    else:
        connect_args = {
            "application_name": cfg.application_name,
            # libpq rounds connect_timeout up to 2 s and takes whole seconds.
            "connect_timeout": max(2, round(cfg.connect_timeout)),
            **tls.libpq_params(),
            **detect.psycopg_statement_options(mode),
        }
    url = URL.create(
        f"postgresql+{driver}",
        username=dsn.user,
        password=dsn.password,
        host=None if dsn.is_unix_socket else dsn.host,
        port=None if dsn.is_unix_socket else dsn.port,
        database=dsn.database,
        query={**query, "host": dsn.host} if dsn.is_unix_socket else query,
    )
    options: dict[str, Any] = {"connect_args": connect_args}
    if asynchronous is None:
        asynchronous = driver == "asyncpg"
    if cfg.profile == "serverless" or route == "direct":
        options["poolclass"] = NullPool
    else:
        options.update(
            poolclass=AsyncAdaptedQueuePool if asynchronous else QueuePool,
            pool_size=cfg.max_size,
            max_overflow=0,
            pool_timeout=cfg.acquire_timeout,
            pool_recycle=cfg.max_lifetime,
            pool_pre_ping=True,
        )
    return url, options


def create_async_engine(
    *,
    driver: Driver = "asyncpg",
    route: EngineRoute = "pooled",
    settings: Settings | None = None,
    **engine_kwargs: Any,
) -> AsyncEngine:
    """An ``AsyncEngine`` on the pooled URL (``route="direct"``: the direct one), safe behind a transaction pooler.

    ``driver`` is ``"asyncpg"`` (default) or ``"psycopg"``. Settings come from the environment
    (``POOLKIT_POOLED_URL``, ``POOLKIT_DIRECT_URL``, ``POOLKIT_SSLMODE``, ...) or ``settings``, and
    keywords that name a poolkit setting (``max_size=3``, ``profile="server"``) override them; the other
    ``engine_kwargs`` go to SQLAlchemy and win over poolkit's choices (see the module docstring).
    """
    settings = _settings(settings, engine_kwargs)
    url, options = engine_options(driver=driver, route=route, settings=settings, asynchronous=True)
    options.update(engine_kwargs)
    return _sa_create_async_engine(url, **options)


def create_engine(*, route: EngineRoute = "pooled", settings: Settings | None = None, **engine_kwargs: Any) -> Engine:
    """A sync psycopg ``Engine`` on the pooled URL (``route="direct"``: the direct one); see ``create_async_engine``."""
    settings = _settings(settings, engine_kwargs)
    url, options = engine_options(driver="psycopg", route=route, settings=settings, asynchronous=False)
    options.update(engine_kwargs)
    return sqlalchemy.create_engine(url, **options)


def migration_engine(*, settings: Settings | None = None, **engine_kwargs: Any) -> Engine:
    """A sync psycopg ``Engine`` on the direct URL, for Alembic and other migration/introspection tools.

    ``NullPool``: a migration opens one connection and closes it. Without a direct URL it uses the
    pooled URL when that is not a transaction pooler, else raises ConfigError naming
    ``POOLKIT_DIRECT_URL``.
    """
    return create_engine(route="direct", settings=settings, **engine_kwargs)
