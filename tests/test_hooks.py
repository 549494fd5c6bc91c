"""Connection set-up hooks (asyncpg's init/setup, psycopg_pool's configure/reset), max_waiting, pool.connection()."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.types.numeric import FloatLoader

import poolkit
from poolkit import ConfigError, PoolTimeout
from poolkit.dev.devstack import DevStack
from poolkit.errors import TooManyWaiting


async def poll(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def poll_sync(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def timeouts(pool: Any) -> float:
    """``poolkit_pool_acquire_timeouts_total`` of ``pool``, as a scrape reads it."""
    name, driver, route = pool.metric_labels
    value = REGISTRY.get_sample_value(
        "poolkit_pool_acquire_timeouts_total", {"pool": name, "driver": driver, "route": route}
    )
    return value or 0.0


# ---------------------------------------------------------------- asyncpg: init, setup, reset


async def test_asyncpg_init_sets_a_type_codec_through_the_pooler(stack_env: DevStack) -> None:
    async def init(conn: Any) -> None:
        await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")

    plain = await poolkit.create_pool(name="hooks-plain")
    hooked = await poolkit.create_pool(name="hooks-init", init=init)
    try:
        assert plain.mode.value == hooked.mode.value == "transaction"
        # Without the hook asyncpg hands json over as text; with it, the codec decodes it.
        assert await plain.fetchval("""SELECT '{"a": [1, 2]}'::json""") == '{"a": [1, 2]}'
        assert await hooked.fetchval("""SELECT '{"a": [1, 2]}'::json""") == {"a": [1, 2]}
        assert await hooked.fetchval("SELECT $1::json ->> 'k'", {"k": "v"}) == "v"  # and encodes parameters
    finally:
        await plain.close()
        await hooked.close()


async def test_asyncpg_setup_runs_per_checkout_and_reset_per_return(stack_env: DevStack) -> None:
    events: list[str] = []

    async def setup(conn: Any) -> None:
        events.append("setup")

    async def reset(conn: Any) -> None:
        events.append("reset")

    pool = await poolkit.create_pool(name="hooks-setup", setup=setup, reset=reset)
    try:
        events.clear()  # create_pool's own check-out and return
        for _ in range(3):
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        assert events == ["setup", "reset"] * 3
    finally:
        await pool.close()


# ---------------------------------------------------------------- psycopg: configure, reset


async def test_psycopg_configure_registers_a_loader_and_reset_runs_on_return(stack_env: DevStack) -> None:
    returned: list[int] = []

    async def configure(conn: Any) -> None:
        conn.adapters.register_loader("numeric", FloatLoader)

    async def reset(conn: Any) -> None:
        returned.append(conn.info.backend_pid)

    plain = await poolkit.create_pool(driver="psycopg", name="hooks-psycopg-plain")
    hooked = await poolkit.create_pool(driver="psycopg", name="hooks-psycopg", configure=configure, reset=reset)
    try:
        assert await plain.fetchval("SELECT 1.5::numeric") == Decimal("1.5")
        value = await hooked.fetchval("SELECT 1.5::numeric")
        assert value == 1.5 and isinstance(value, float)
        await poll(lambda: len(returned) >= 2)  # psycopg_pool runs reset in its worker after each return
    finally:
        await plain.close()
        await hooked.close()


def test_sync_pool_configure_and_reset(stack_env: DevStack) -> None:
    returned: list[int] = []

    def configure(conn: Any) -> None:
        conn.adapters.register_loader("numeric", FloatLoader)

    def reset(conn: Any) -> None:
        returned.append(conn.info.backend_pid)

    pool = poolkit.create_sync_pool(name="hooks-sync", configure=configure, reset=reset)
    try:
        assert pool.fetchval("SELECT 1.5::numeric") == 1.5
        poll_sync(lambda: len(returned) >= 2)
    finally:
        pool.close()


async def test_a_hook_for_the_other_driver_or_of_the_wrong_kind_is_refused(stack_env: DevStack) -> None:
    async def hook(conn: Any) -> None:
        return None

    def plain(conn: Any) -> None:
        return None

    with pytest.raises(ConfigError, match=r"init= is asyncpg's hook .* driver is psycopg: with psycopg, configure="):
        await poolkit.create_pool(driver="psycopg", init=hook, open=False)
    with pytest.raises(ConfigError, match=r"configure= is psycopg's hook .* with asyncpg, init="):
        await poolkit.create_pool(configure=hook, open=False)
    with pytest.raises(ConfigError, match=r"init= must be an async function \(async def\) in an async pool"):
        await poolkit.create_pool(init=plain, open=False)
    with pytest.raises(ConfigError, match=r"configure= must be a plain function \(not async def\) in the sync pool"):
        poolkit.create_sync_pool(configure=hook, open=False)
    with pytest.raises(ConfigError, match=r"init= is a connection hook, not a setting: pass it to poolkit.create_pool"):
        poolkit.load_settings(init=hook)


async def test_a_hook_that_leaves_session_state_on_the_pooler_is_refused(stack_env: DevStack) -> None:
    async def init(conn: Any) -> None:
        await conn.execute("SET search_path TO public")

    with pytest.raises(poolkit.SessionStateError, match="transaction pooler"):
        await poolkit.create_pool(name="hooks-session", init=init)


# ---------------------------------------------------------------- max_waiting


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_max_waiting_refuses_the_caller_beyond_the_queue(stack_env: DevStack, driver: str) -> None:
    pool = await poolkit.create_pool(driver=driver, name=f"hooks-wait-{driver}", max_waiting=1, acquire_timeout=30)
    unlimited = await poolkit.create_pool(driver=driver, name=f"hooks-nowait-{driver}", acquire_timeout=0.3)
    try:
        async with pool.acquire():
            waiter = asyncio.create_task(pool.fetchval("SELECT 7"))
            await poll(lambda: pool.waiting == 1)
            started = time.monotonic()
            before = timeouts(pool)
            with pytest.raises(TooManyWaiting, match=r"1 caller\(s\) already wait .*max_waiting limit"):
                await pool.fetchval("SELECT 1")
            assert time.monotonic() - started < 5  # refused at once, not after acquire_timeout (30 s)
            assert timeouts(pool) == before + 1  # seen by the exhaustion metric (and its alert)
        assert await waiter == 7  # the queued caller was served
        # Without the limit, a third caller queues and waits out its acquire_timeout.
        async with unlimited.acquire():
            queued = asyncio.create_task(unlimited.fetchval("SELECT 1"))
            await poll(lambda: unlimited.waiting == 1)
            with pytest.raises(PoolTimeout) as info:
                await unlimited.fetchval("SELECT 1")
            assert not isinstance(info.value, TooManyWaiting)
            with pytest.raises(PoolTimeout):
                await queued
    finally:
        await pool.close()
        await unlimited.close()


def test_sync_max_waiting(stack_env: DevStack) -> None:
    pool = poolkit.create_sync_pool(name="hooks-wait-sync", max_waiting=1, acquire_timeout=30)
    results: list[Any] = []
    try:
        with pool.acquire():
            waiter = threading.Thread(target=lambda: results.append(pool.fetchval("SELECT 7")))
            waiter.start()
            poll_sync(lambda: pool.waiting == 1)
            with pytest.raises(TooManyWaiting):
                pool.fetchval("SELECT 1")
        waiter.join(timeout=30)
        assert results == [7]
    finally:
        pool.close()


# ---------------------------------------------------------------- pool.connection()


async def test_connection_is_psycopg_pools_name_for_acquire(stack_env: DevStack) -> None:
    table = f"hooks_conn_{uuid.uuid4().hex[:8]}"
    pool = await poolkit.create_pool(driver="psycopg", name="hooks-connection")
    try:
        await pool.execute(f"CREATE TABLE {table} (x int)")
        async with pool.connection() as conn:
            assert isinstance(conn, psycopg.AsyncConnection)
            assert pool.stats()["in_use"] == 1
            await conn.execute(f"INSERT INTO {table} VALUES (1)")

        async def insert_then_fail() -> None:
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
                raise LookupError("the app's error")

        with pytest.raises(LookupError):
            await insert_then_fail()
        # Committed on success, rolled back on error, as psycopg_pool's connection() does.
        assert await pool.fetch(f"SELECT x FROM {table}") == [(1,)]
        assert pool.stats()["in_use"] == 0
    finally:
        await pool.execute(f"DROP TABLE IF EXISTS {table}")
        await pool.close()


def test_sync_connection_alias(stack_env: DevStack) -> None:
    pool = poolkit.create_sync_pool(name="hooks-connection-sync")
    try:
        with pool.connection() as conn:
            assert isinstance(conn, psycopg.Connection)
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert pool.stats()["in_use"] == 1
        assert pool.stats()["in_use"] == 0
    finally:
        pool.close()
