"""Routing on the real stack: statements sent through ``pool.routed(sql)`` land on the direct backend when
``classify`` says so and stay on PgBouncer otherwise; without routing, session state through the pooler
is lost (and leaks to another client). Also ``poolkit.direct()`` and ``poolkit.migration_url()``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import create_async_engine

import poolkit
from poolkit.dev.devstack import DevStack
from poolkit.errors import ConfigError, SessionStateError
from poolkit.pool.registry import forget_pools


@pytest.fixture
async def pool(stack_env: DevStack) -> AsyncIterator[poolkit.Pool]:
    created = await poolkit.create_pool(name="routed")
    yield created
    await created.close()


@pytest.fixture
def schema(stack: DevStack) -> Iterator[str]:
    name = f"routed_{uuid.uuid4().hex[:8]}"
    stack.psql(f"CREATE SCHEMA {name} AUTHORIZATION app;")
    yield name
    stack.psql(f"DROP SCHEMA {name} CASCADE;")


def _pids_that_ran(stack: DevStack, marker: str) -> set[int]:
    """Backends whose last statement carried ``marker`` (pg_stat_activity keeps each backend's last query;
    PgBouncer in transaction mode runs no reset query, so a server backend's last query is the client's)."""
    with psycopg.connect(stack.superuser_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()", (f"%{marker}%",)
        ).fetchall()
    return {r[0] for r in rows}


def _bouncer_server_pids(stack: DevStack) -> set[int]:
    assert stack.pgbouncer is not None
    return {int(row["remote_pid"]) for row in stack.pgbouncer.admin("SHOW SERVERS")}


def _relation_schemas(stack: DevStack, table: str) -> set[str]:
    with psycopg.connect(stack.superuser_url, autocommit=True) as conn:
        rows = conn.execute("SELECT schemaname FROM pg_tables WHERE tablename = %s", (table,)).fetchall()
    return {r[0] for r in rows}


def _routed_count(route: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "poolkit_routed_statements_total",
        {"pool": "routed", "driver": "asyncpg", "route": route, "reason": reason},
    )
    return value or 0.0


async def test_routed_statements_land_on_the_direct_backend_and_dml_stays_pooled(
    pool: poolkit.Pool, stack_env: DevStack, schema: str
) -> None:
    stack = stack_env
    assert pool.mode is poolkit.Mode.TRANSACTION
    direct_pid = await pool.direct().fetchval("SELECT pg_backend_pid()")
    assert direct_pid not in _bouncer_server_pids(stack)
    table = f"{schema}.items"
    before = _routed_count("direct", "ddl"), _routed_count("direct", "catalog"), _routed_count("pooled", "none")

    for sql in (f"CREATE TABLE {table} (id int PRIMARY KEY, v text)", f"SET search_path TO {schema}, public"):
        target = pool.routed(sql)
        assert target is pool.direct(), sql
        async with target.acquire() as conn:
            await conn.execute(sql)
            assert await conn.fetchval("SELECT pg_backend_pid()") == direct_pid, sql

    catalog = "SELECT pg_backend_pid() FROM pg_catalog.pg_class LIMIT 1"
    assert await pool.routed(catalog).fetchval(catalog) == direct_pid

    dml = f"INSERT INTO {table} (id, v) VALUES ($1, $2) RETURNING pg_backend_pid()"
    target = pool.routed(dml)
    assert target is pool
    dml_pid = await target.fetchval(dml, 1, "one")
    assert dml_pid != direct_pid
    assert dml_pid in _bouncer_server_pids(stack)  # a PgBouncer server connection ran it
    assert await pool.fetchval(f"SELECT v FROM {table} WHERE id = 1") == "one"

    assert _routed_count("direct", "ddl") == before[0] + 1
    assert _routed_count("direct", "catalog") == before[1] + 1
    assert _routed_count("pooled", "none") == before[2] + 1


async def _hold_server(stack: DevStack, pid: int) -> tuple[psycopg.AsyncConnection, list[psycopg.AsyncConnection]]:
    """Open transactions through PgBouncer until one sits on server backend ``pid``; return it and the others."""
    others: list[psycopg.AsyncConnection] = []
    assert stack.pgbouncer is not None
    for _ in range(stack.pgbouncer.pool_size):
        conn = await psycopg.AsyncConnection.connect(stack.pooled_url, prepare_threshold=None)
        got = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone() or [0])[0]  # opens a transaction
        if got == pid:
            return conn, others
        others.append(conn)
    raise AssertionError(f"no PgBouncer server connection is backend {pid}")


async def test_session_set_through_the_pooler_is_lost_and_leaks_but_routed_it_holds(
    pool: poolkit.Pool, stack_env: DevStack, schema: str
) -> None:
    """``SET search_path`` then an unqualified ``CREATE TABLE`` on one connection, as migration scripts do.

    Deterministic: after the SET, another client holds the server backend the SET ran on (in an open
    transaction), so through the pooler the CREATE TABLE must run on a different backend.
    """
    stack = stack_env
    marker = uuid.uuid4().hex
    set_sql = f"/* {marker} */ SET search_path TO {schema}"

    # poolkit's pooled pool refuses the SET before sending it: it would leak to other clients of the pooler.
    with pytest.raises(SessionStateError, match=r"pool\.direct"):
        async with pool.acquire() as conn:
            await conn.execute(set_sql)
    assert _pids_that_ran(stack, marker) == set()

    # What it prevents, on a plain asyncpg connection through the pooler: the SET runs on some PgBouncer
    # server backend ...
    conn = await asyncpg.connect(stack.pooled_url, statement_cache_size=0)
    try:
        await conn.execute(set_sql)
        (set_pid,) = _pids_that_ran(stack, marker)
        holder, others = await _hold_server(stack, set_pid)
        try:
            for other in others:
                await other.commit()
            await conn.execute("CREATE TABLE lost_set (id int)")
            # ... the table lands in the default schema, and another client inherited the search_path.
            assert _relation_schemas(stack, "lost_set") == {"public"}
            leaked = (await (await holder.execute("SHOW search_path")).fetchone() or [""])[0]
            assert leaked == schema
        finally:
            await holder.execute("RESET ALL")  # leave no state on the shared PgBouncer's server
            await holder.commit()
            for other in (holder, *others):
                await other.close()
            stack.psql("DROP TABLE IF EXISTS public.lost_set;")
    finally:
        await conn.close()

    # The same code on the routed pool: the SET holds for the connection, and is reset when it goes back.
    async with pool.routed(set_sql).acquire() as conn:
        await conn.execute(set_sql)
        await conn.execute("CREATE TABLE kept_set (id int)")
    assert _relation_schemas(stack, "kept_set") == {schema}
    assert await pool.direct().fetchval("SHOW search_path") == '"$user", public'


def test_sync_pool_routes_too(stack_env: DevStack, schema: str) -> None:
    pool = poolkit.create_sync_pool(name="routed-sync")
    try:
        direct_pid = pool.direct().fetchval("SELECT pg_backend_pid()")
        ddl = f"CREATE TABLE {schema}.sync_items (id int)"
        assert pool.routed(ddl) is pool.direct()
        pool.routed(ddl).execute(ddl)
        assert (
            pool.routed("SELECT pg_backend_pid() FROM pg_catalog.pg_database LIMIT 1").fetchval(
                "SELECT pg_backend_pid() FROM pg_catalog.pg_database LIMIT 1"
            )
            == direct_pid
        )
        dml = f"INSERT INTO {schema}.sync_items VALUES (%s)"
        assert pool.routed(dml) is pool
        pool.routed(dml).execute(dml, 7)
        assert pool.fetchval(f"SELECT id FROM {schema}.sync_items") == 7
    finally:
        pool.close()


async def test_routed_without_a_direct_url_names_the_setting(
    stack_env: DevStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POOLKIT_DIRECT_URL")
    pool = await poolkit.create_pool(name="routed-nodirect")
    try:
        assert pool.routed("SELECT 1") is pool  # DML is unaffected
        assert await pool.routed("SELECT 1").fetchval("SELECT 1") == 1
        with pytest.raises(ConfigError, match="POOLKIT_DIRECT_URL"):
            pool.routed("CREATE TABLE t (id int)")
    finally:
        await pool.close()


async def test_poolkit_direct_is_the_process_wide_direct_pool(stack_env: DevStack) -> None:
    forget_pools()
    try:
        direct = poolkit.direct(name="routed-direct")
        assert direct is poolkit.get_pool(name="routed-direct").direct()
        assert direct.route == "direct"
        assert await direct.fetchval("SELECT inet_server_port()") == stack_env.pg_port
    finally:
        await poolkit.get_pool(name="routed-direct").close()
        forget_pools()


def test_migration_url_per_driver(stack_env: DevStack) -> None:
    stack = stack_env
    plain = poolkit.migration_url()
    assert plain.startswith("postgresql://")
    dsn = poolkit.Dsn.parse(plain)
    assert (dsn.port, dsn.password) == (stack.pg_port, stack.app_password)  # tools need the password
    assert dsn.query == {"sslmode": "require", "sslrootcert": str(stack.ca_file)}
    with psycopg.connect(plain) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (stack.pg_port,)

    psy = poolkit.migration_url(driver="psycopg")
    assert psy.startswith("postgresql+psycopg://") and "sslmode=require" in psy
    engine = sa.create_engine(psy, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT inet_server_port()")).scalar_one() == stack.pg_port
    engine.dispose()

    apg = poolkit.migration_url(driver="asyncpg")
    assert apg.startswith("postgresql+asyncpg://") and "ssl=require" in apg and "sslmode" not in apg

    async def asyncpg_port() -> int:
        aengine = create_async_engine(apg, poolclass=sa.pool.NullPool)
        try:
            async with aengine.connect() as conn:
                return int((await conn.execute(sa.text("SELECT inet_server_port()"))).scalar_one())
        finally:
            await aengine.dispose()

    import asyncio

    assert asyncio.run(asyncpg_port()) == stack.pg_port


def test_migration_url_fallback_and_errors(stack_env: DevStack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = stack_env
    monkeypatch.delenv("POOLKIT_DIRECT_URL")
    # Only a transaction pooler: refuse, naming the setting, never echoing the URL.
    with pytest.raises(ConfigError, match="POOLKIT_DIRECT_URL") as info:
        poolkit.migration_url()
    assert stack.app_password not in str(info.value)
    assert "pgbouncer=true" in str(info.value)  # says why it is a pooler
    # A pooled URL that is not a transaction pooler is good enough for tools.
    monkeypatch.setenv("POOLKIT_POOLED_URL", stack.direct_url)
    assert poolkit.Dsn.parse(poolkit.migration_url()).port == stack.pg_port
    with pytest.raises(ConfigError, match="driver='pg8000'"):
        poolkit.migration_url(driver="pg8000")  # type: ignore[arg-type]
