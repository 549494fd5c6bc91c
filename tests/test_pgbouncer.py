"""Through a real PgBouncer in transaction mode: poolkit pools run a mixed workload with zero errors,
the raw drivers with their defaults fail with the prepared-statement errors users report."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import asyncpg
import psycopg
import psycopg_pool
import pytest

import poolkit
from poolkit.dev.devstack import DevStack

TASKS = 20
PER_TASK = 50  # 20 x 50 = 1,000 statements


def _table(stack: DevStack) -> str:
    name = f"items_{uuid.uuid4().hex[:8]}"
    stack.psql(
        f"CREATE TABLE {name} (id bigserial PRIMARY KEY, k int NOT NULL, v text NOT NULL);"
        f"GRANT ALL ON {name} TO app; GRANT ALL ON SEQUENCE {name}_id_seq TO app;"
    )
    return name


def _statements(table: str, task: int, ph: str) -> list[tuple[str, tuple[Any, ...]]]:
    """Mixed parameterised statements; the same texts repeat, which is what makes drivers prepare them."""
    p1, p2 = ("$1", "$2") if ph == "$" else ("%s", "%s")
    out: list[tuple[str, tuple[Any, ...]]] = []
    for i in range(PER_TASK):
        kind = i % 5
        if kind == 0:
            out.append((f"INSERT INTO {table} (k, v) VALUES ({p1}, {p2})", (task, f"t{task}-{i}")))
        elif kind == 1:
            out.append((f"SELECT count(*) FROM {table} WHERE k = {p1}", (task,)))
        elif kind == 2:
            out.append((f"UPDATE {table} SET v = {p1} WHERE k = {p2}", (f"u{i}", task)))
        elif kind == 3:
            out.append((f"SELECT v FROM {table} WHERE k = {p1} ORDER BY id LIMIT {p2}", (task, 3)))
        else:
            out.append((f"SELECT {p1}::int + {p2}::int", (task, i)))
    return out


async def _run_async(acquire: Any, table: str, ph: str) -> list[BaseException]:
    errors: list[BaseException] = []

    async def worker(task: int) -> None:
        for sql, args in _statements(table, task, ph):
            try:
                async with acquire() as conn:
                    if ph == "$":
                        await conn.fetch(sql, *args)
                    else:
                        await conn.execute(sql, args)
            except (asyncpg.PostgresError, psycopg.Error, poolkit.PoolkitError) as exc:
                errors.append(exc)

    await asyncio.gather(*(worker(t) for t in range(TASKS)))
    return errors


def _prepared_error(errors: list[BaseException]) -> bool:
    return any("prepared statement" in str(e) or "bind message supplies" in str(e) for e in errors)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_async_workload_through_pgbouncer(stack: DevStack, pooled_url: str, driver: str) -> None:
    table = _table(stack)
    ph = "$" if driver == "asyncpg" else "%"

    # Without poolkit: the driver's defaults prepare statements, and PgBouncer hands the next
    # transaction to a server connection that never saw them.
    if driver == "asyncpg":
        raw = await asyncpg.create_pool(stack.pooled_url, min_size=0, max_size=3)
        raw_errors = await _run_async(raw.acquire, table, ph)
        await raw.close()
    else:
        rawp = psycopg_pool.AsyncConnectionPool(stack.pooled_url, min_size=1, max_size=3, open=False)
        await rawp.open()
        raw_errors = await _run_async(rawp.connection, table, ph)
        await rawp.close()
    assert raw_errors and _prepared_error(raw_errors), raw_errors[:3]

    pool = await poolkit.create_pool(driver=driver, pooled_url=pooled_url, max_size=3, name=f"pgb-{driver}")
    try:
        assert pool.mode is poolkit.Mode.TRANSACTION
        ours = _table(stack)
        errors = await _run_async(pool.acquire, ours, ph)
        assert errors == []
        assert await pool.fetchval(f"SELECT count(*) FROM {ours}") == TASKS * PER_TASK // 5
    finally:
        await pool.close()


def test_sync_workload_through_pgbouncer(stack: DevStack, pooled_url: str) -> None:
    table = _table(stack)

    def run(acquire: Any) -> list[BaseException]:
        assert table
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker(task: int) -> None:
            for sql, args in _statements(table, task, "%"):
                try:
                    with acquire() as conn:
                        conn.execute(sql, args)
                except (psycopg.Error, poolkit.PoolkitError) as exc:
                    with lock:
                        errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(TASKS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return errors

    with psycopg_pool.ConnectionPool(stack.pooled_url, min_size=1, max_size=3) as raw:
        raw_errors = run(raw.connection)
    assert raw_errors and _prepared_error(raw_errors), raw_errors[:3]

    pool = poolkit.create_sync_pool(pooled_url=pooled_url, max_size=3, name="pgb-sync")
    try:
        table = _table(stack)
        assert run(pool.acquire) == []
        assert pool.fetchval(f"SELECT count(*) FROM {table}") == TASKS * PER_TASK // 5
    finally:
        pool.close()
