"""poolkit.sqlalchemy through a real PgBouncer in transaction mode: the engines run a concurrent workload with
zero prepared-statement errors; SQLAlchemy's default asyncpg engine on the same pooler fails."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

import poolkit
from poolkit import sqlalchemy as pk_sa
from poolkit.dev.devstack import DevStack
from poolkit.errors import ConfigError

TASKS = 12
TRANSACTIONS = 15  # 12 tasks x 15 transactions x 3 statements = 540 statements


def _table(stack: DevStack) -> str:
    name = f"sa_items_{uuid.uuid4().hex[:8]}"
    stack.psql(
        f"CREATE TABLE {name} (id bigserial PRIMARY KEY, k int NOT NULL, v text NOT NULL);"
        f"GRANT ALL ON {name} TO app; GRANT ALL ON SEQUENCE {name}_id_seq TO app;"
    )
    return name


def _statements(table: str) -> list[sa.TextClause]:
    return [
        sa.text(f"INSERT INTO {table} (k, v) VALUES (:k, :v)"),
        sa.text(f"SELECT count(*) FROM {table} WHERE k = :k"),
        sa.text(f"UPDATE {table} SET v = :v WHERE k = :k"),
    ]


async def _async_workload(engine: AsyncEngine, table: str) -> tuple[int, list[str]]:
    """Run the workload; return (statements that succeeded, error messages)."""
    ok = 0
    errors: list[str] = []

    async def worker(task: int) -> None:
        nonlocal ok
        for i in range(TRANSACTIONS):
            try:
                async with engine.begin() as conn:
                    for stmt in _statements(table):
                        await conn.execute(stmt, {"k": task, "v": f"{task}-{i}"})
                        ok += 1
            except Exception as exc:  # the assertion reports what failed
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    await asyncio.gather(*(worker(t) for t in range(TASKS)))
    return ok, errors


def _count(stack: DevStack, table: str) -> int:
    return int(stack.psql(f"SELECT count(*) FROM {table}").split()[0])


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_async_engine_through_pgbouncer_has_no_prepared_statement_errors(
    stack_env: DevStack, driver: Any
) -> None:
    table = _table(stack_env)
    engine = pk_sa.create_async_engine(driver=driver)
    try:
        ok, errors = await _async_workload(engine, table)
    finally:
        await engine.dispose()
    assert errors == []
    assert ok == TASKS * TRANSACTIONS * 3
    assert _count(stack_env, table) == TASKS * TRANSACTIONS


async def test_sqlalchemy_default_asyncpg_engine_fails_through_pgbouncer(stack: DevStack) -> None:
    """The same workload with SQLAlchemy's defaults on the same pooler: prepared-statement errors."""
    table = _table(stack)
    url = poolkit.Dsn.parse(stack.pooled_url).without_params("sslmode").with_params(ssl="require").to_url()
    engine = sa_create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"))
    errors: list[str] = []
    try:
        # Which server connection PgBouncer hands out is up to its scheduling: a round can, rarely, keep each
        # client on one server. A few rounds make the (normally immediate) failure certain.
        for _ in range(5):
            _, errors = await _async_workload(engine, table)
            if errors:
                break
    finally:
        await engine.dispose()
    assert errors, "SQLAlchemy's default asyncpg engine ran cleanly through PgBouncer: the test no longer bites"
    assert any("prepared statement" in e for e in errors), errors[:5]


def test_sync_engine_through_pgbouncer_has_no_prepared_statement_errors(stack_env: DevStack) -> None:
    table = _table(stack_env)
    engine = pk_sa.create_engine()
    errors: list[str] = []

    def worker(task: int) -> None:
        for i in range(TRANSACTIONS):
            try:
                with engine.begin() as conn:
                    for stmt in _statements(table):
                        conn.execute(stmt, {"k": task, "v": f"{task}-{i}"})
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(TASKS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.dispose()
    assert errors == []
    assert _count(stack_env, table) == TASKS * TRANSACTIONS


def test_engine_options_follow_the_settings(stack_env: DevStack) -> None:
    url, options = pk_sa.engine_options(driver="asyncpg")
    args = options["connect_args"]
    assert url.drivername == "postgresql+asyncpg"
    assert url.port == stack_env.pgbouncer_port
    assert "pgbouncer" not in url.query and "sslmode" not in url.query
    assert args["statement_cache_size"] == 0
    assert args["prepared_statement_cache_size"] == 0
    assert args["prepared_statement_name_func"]() == ""
    assert options["poolclass"] is sa.pool.NullPool  # serverless profile: the pooler is the pool
    assert "***" in repr(url)  # SQLAlchemy masks the password

    url, options = pk_sa.engine_options(driver="psycopg", settings=poolkit.load_settings(profile="server", max_size=4))
    assert options["connect_args"]["prepare_threshold"] is None
    assert options["connect_args"]["sslmode"] == "require"
    assert options["poolclass"] is sa.pool.QueuePool
    assert (options["pool_size"], options["max_overflow"], options["pool_pre_ping"]) == (4, 0, True)

    # The direct URL keeps prepared statements: nothing in between drops them.
    url, options = pk_sa.engine_options(driver="asyncpg", route="direct")
    assert url.port == stack_env.pg_port
    assert "statement_cache_size" not in options["connect_args"]


def test_migration_engine_reaches_the_direct_server(stack_env: DevStack) -> None:
    engine = pk_sa.migration_engine()
    try:
        with engine.connect() as conn:
            port = conn.execute(sa.text("SELECT inet_server_port()")).scalar_one()
    finally:
        engine.dispose()
    assert port == stack_env.pg_port


def test_migration_engine_without_a_direct_url_behind_a_pooler_names_the_setting(
    stack_env: DevStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POOLKIT_DIRECT_URL")
    with pytest.raises(ConfigError, match="POOLKIT_DIRECT_URL") as info:
        pk_sa.migration_engine()
    assert stack_env.app_password not in str(info.value)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.parametrize("profile", ["serverless", "server"])
async def test_async_engine_under_each_profile(stack_env: DevStack, driver: Any, profile: str) -> None:
    table = _table(stack_env)
    size = 3 if profile == "server" else 1
    # poolkit's settings as keywords, as create_pool takes them; the rest (echo) is SQLAlchemy's.
    engine = pk_sa.create_async_engine(driver=driver, profile=profile, max_size=size, echo=False)
    try:
        expected = sa.pool.AsyncAdaptedQueuePool if profile == "server" else sa.pool.NullPool
        assert type(engine.pool) is expected
        ok, errors = await _async_workload(engine, table)
        if profile == "server":
            assert engine.pool.size() == 3  # type: ignore[attr-defined]
            assert engine.pool.checkedin() <= 3  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
    assert errors == []
    assert ok == TASKS * TRANSACTIONS * 3
    assert _count(stack_env, table) == TASKS * TRANSACTIONS


def test_sqlalchemy_refuses_a_queuepool_for_an_async_engine(stack_env: DevStack) -> None:
    # What poolkit's server profile did before it chose AsyncAdaptedQueuePool for async engines.
    url, options = pk_sa.engine_options(settings=poolkit.load_settings(profile="server"), asynchronous=False)
    assert options["poolclass"] is sa.pool.QueuePool
    with pytest.raises(sa.exc.ArgumentError, match="QueuePool cannot be used with asyncio engine"):
        sa_create_async_engine(url, **options)


def test_engine_factories_take_poolkit_settings_as_keywords(stack_env: DevStack) -> None:
    engine = pk_sa.create_engine(profile="server", max_size=5, acquire_timeout=2.5, pool_pre_ping=False)
    try:
        assert type(engine.pool) is sa.pool.QueuePool
        assert engine.pool.size() == 5  # type: ignore[attr-defined]
        assert engine.pool._timeout == 2.5  # type: ignore[attr-defined]
        assert engine.pool._pre_ping is False  # SQLAlchemy's own keyword still wins
    finally:
        engine.dispose()
    base = poolkit.load_settings(application_name="sa-base")

    async def name_through(engine: AsyncEngine) -> str:
        try:
            async with engine.connect() as conn:
                return str((await conn.execute(sa.text("SELECT current_setting('application_name')"))).scalar_one())
        finally:
            await engine.dispose()

    async_engine = pk_sa.create_async_engine(settings=base, max_size=2, profile="server")
    assert async_engine.pool.size() == 2  # type: ignore[attr-defined]
    assert asyncio.run(name_through(async_engine)) == "sa-base"  # the rest of `settings` is kept
    with pytest.raises(ConfigError, match=r"max_size \(keyword argument\).*serverless range"):
        pk_sa.create_async_engine(max_size=9)
