"""Money paths (poolkit.money): idempotency keys, retries and ambiguous commits against real PostgreSQL + PgBouncer."""

from __future__ import annotations

import asyncio
import decimal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio

from poolkit import ConfigError, IdempotencyConflict, Pool, create_pool
from poolkit.dev.devstack import DevStack
from poolkit.money import ensure_table, idempotent

TABLE = "money_demo.idem"

SETUP = """
DROP SCHEMA IF EXISTS money_demo CASCADE;
CREATE SCHEMA money_demo AUTHORIZATION app;
SET ROLE app;
CREATE TABLE money_demo.accounts (id int PRIMARY KEY, balance numeric(12, 2) NOT NULL CHECK (balance >= 0));
-- Runs during COMMIT (deferred), only when a transaction asks: lets a test cut the network mid-COMMIT.
CREATE FUNCTION money_demo.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF NEW.id = 1 AND current_setting('money_demo.slow_commit', true) = 'on' THEN PERFORM pg_sleep(2); END IF;
  RETURN NULL;
END $f$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON money_demo.accounts
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION money_demo.slow_commit();
RESET ROLE;
"""


@pytest.fixture(scope="module")
def money_stack(stack: DevStack) -> DevStack:
    stack.psql(SETUP)
    return stack


@pytest.fixture
def fresh(money_stack: DevStack) -> DevStack:
    """Account 1 holds 100.00, account 2 holds 0.00, and the idempotency table is empty."""
    money_stack.psql(
        "TRUNCATE money_demo.accounts; INSERT INTO money_demo.accounts VALUES (1, 100), (2, 0);"
        f"DROP TABLE IF EXISTS {TABLE};"
    )
    return money_stack


@pytest_asyncio.fixture(params=["asyncpg", "psycopg"], loop_scope="function")
async def pool(request: pytest.FixtureRequest, fresh: DevStack, pooled_url: str) -> AsyncIterator[Pool]:
    """A server-profile pool of 20 through the transaction pooler (PgBouncer, 3 server connections)."""
    p = await create_pool(
        driver=request.param,
        pooled_url=pooled_url,
        direct_url=fresh.direct_url,
        sslrootcert=str(fresh.ca_file),
        profile="server",
        max_size=20,
        application_name="money-test",
    )
    await ensure_table(p, table=TABLE)
    try:
        yield p
    finally:
        await p.close()


def balances(stack: DevStack) -> tuple[decimal.Decimal, decimal.Decimal]:
    out = stack.psql("SELECT balance FROM money_demo.accounts ORDER BY id").split()
    return decimal.Decimal(out[0]), decimal.Decimal(out[1])


def key_rows(stack: DevStack) -> int:
    return int(stack.psql(f"SELECT count(*) FROM {TABLE}").strip())


async def run(conn: Any, sql: str, *args: Any) -> None:
    """One statement on either driver's connection; ``sql`` uses $n placeholders."""
    if isinstance(conn, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy):
        await conn.execute(sql, *args)
    else:
        for n in range(len(args), 0, -1):
            sql = sql.replace(f"${n}", "%s")
        await conn.execute(sql, args or None)


def transfer(amount: str, calls: list[int], *, between: Callable[[], Awaitable[None]] | None = None) -> Any:
    """The caller's money move: debit account 1, credit account 2 (``between`` runs after the debit)."""

    async def fn(conn: Any) -> dict[str, Any]:
        calls.append(1)
        await run(conn, "UPDATE money_demo.accounts SET balance = balance - $1 WHERE id = 1", decimal.Decimal(amount))
        if between is not None:
            await between()
        await run(conn, "UPDATE money_demo.accounts SET balance = balance + $1 WHERE id = 2", decimal.Decimal(amount))
        return {"moved": decimal.Decimal(amount), "to": 2}

    return fn


async def test_twenty_concurrent_replays_move_money_once(pool: Pool, fresh: DevStack) -> None:
    calls: list[int] = []
    request = {"from": 1, "to": 2, "amount": "10.00"}
    results = await asyncio.gather(
        *(idempotent(pool, "order-42", transfer("10.00", calls), request=request, table=TABLE) for _ in range(20))
    )
    assert len(calls) == 1
    assert balances(fresh) == (decimal.Decimal("90.00"), decimal.Decimal("10.00"))
    assert key_rows(fresh) == 1
    # The first caller and the 19 replays see the same recorded JSON.
    assert all(r == {"moved": "10.00", "to": 2} for r in results)


async def test_without_a_unique_key_concurrent_retries_move_money_many_times(fresh: DevStack) -> None:
    """The failure the helper prevents: check-then-act without a unique constraint lets every retry through."""
    conns = [await asyncpg.connect(fresh.direct_url) for _ in range(5)]
    fresh.psql("CREATE TABLE money_demo.processed (key text); GRANT ALL ON money_demo.processed TO app")
    checked = asyncio.Barrier(5)

    async def naive(conn: Any) -> None:
        async with conn.transaction():
            seen = await conn.fetchval("SELECT count(*) FROM money_demo.processed WHERE key = 'order-7'")
            await checked.wait()  # every retry has checked before any has recorded: the race, made certain
            if seen == 0:
                await conn.execute("UPDATE money_demo.accounts SET balance = balance - 10 WHERE id = 1")
                await conn.execute("UPDATE money_demo.accounts SET balance = balance + 10 WHERE id = 2")
                await conn.execute("INSERT INTO money_demo.processed VALUES ('order-7')")

    try:
        await asyncio.gather(*(naive(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
        fresh.psql("DROP TABLE money_demo.processed")
    assert balances(fresh) == (decimal.Decimal("50.00"), decimal.Decimal("50.00"))


async def test_a_crash_between_the_statements_leaves_nothing(pool: Pool, fresh: DevStack) -> None:
    calls: list[int] = []

    async def crash() -> None:
        raise RuntimeError("process died after the debit")

    with pytest.raises(RuntimeError, match="after the debit"):
        await idempotent(pool, "order-1", transfer("30.00", calls, between=crash), table=TABLE)
    assert balances(fresh) == (decimal.Decimal("100.00"), decimal.Decimal("0.00"))
    assert key_rows(fresh) == 0, "the key rolled back with the debit"
    # The key was not consumed: the retry runs and moves the money once.
    result = await idempotent(pool, "order-1", transfer("30.00", calls), table=TABLE)
    assert result == {"moved": "30.00", "to": 2}
    assert len(calls) == 2
    assert balances(fresh) == (decimal.Decimal("70.00"), decimal.Decimal("30.00"))


async def test_reusing_a_key_with_other_arguments_is_a_conflict(pool: Pool, fresh: DevStack) -> None:
    calls: list[int] = []
    await idempotent(pool, "order-9", transfer("5.00", calls), request={"amount": "5.00"}, table=TABLE)
    with pytest.raises(IdempotencyConflict, match="different arguments"):
        await idempotent(pool, "order-9", transfer("50.00", calls), request={"amount": "50.00"}, table=TABLE)
    again = await idempotent(pool, "order-9", transfer("5.00", calls), request={"amount": "5.00"}, table=TABLE)
    assert again == {"moved": "5.00", "to": 2}
    assert len(calls) == 1
    assert balances(fresh) == (decimal.Decimal("95.00"), decimal.Decimal("5.00"))


async def test_a_serialization_failure_is_retried(pool: Pool, fresh: DevStack) -> None:
    """Two SERIALIZABLE transactions: a concurrent committed update to the row we then update forces 40001."""
    calls: list[int] = []

    def concurrent_deposit() -> None:
        with psycopg.connect(fresh.direct_url) as other:
            other.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            other.execute("UPDATE money_demo.accounts SET balance = balance + 5 WHERE id = 1")

    async def fn(conn: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            await run(conn, "SELECT balance FROM money_demo.accounts WHERE id = 1")  # snapshot holds 100
            await asyncio.to_thread(concurrent_deposit)
        await run(conn, "UPDATE money_demo.accounts SET balance = balance - 10 WHERE id = 1")
        await run(conn, "UPDATE money_demo.accounts SET balance = balance + 10 WHERE id = 2")
        return "ok"

    assert await idempotent(pool, "order-s", fn, table=TABLE, isolation="serializable") == "ok"
    assert len(calls) == 2, "the first attempt failed with 40001 and was run again"
    assert balances(fresh) == (decimal.Decimal("95.00"), decimal.Decimal("10.00"))

    # Without retries the same interleaving surfaces the serialization failure and moves nothing.
    calls.clear()
    with pytest.raises(Exception, match="could not serialize") as info:
        await idempotent(pool, "order-t", fn, table=TABLE, isolation="serializable", max_attempts=1)
    assert getattr(info.value, "sqlstate", None) == "40001"
    assert balances(fresh) == (decimal.Decimal("100.00"), decimal.Decimal("10.00"))
    assert key_rows(fresh) == 1


async def test_a_deadlock_is_retried(pool: Pool, fresh: DevStack) -> None:
    both_locked = asyncio.Barrier(2)
    calls: list[str] = []

    def opposite(first: int, second: int, name: str) -> Any:
        async def fn(conn: Any) -> str:
            calls.append(name)
            await run(conn, f"UPDATE money_demo.accounts SET balance = balance WHERE id = {first}")  # a row lock
            if calls.count(name) == 1:
                await both_locked.wait()  # each holds one row and wants the other's: PostgreSQL must pick one
            await run(conn, f"UPDATE money_demo.accounts SET balance = balance WHERE id = {second}")
            return name

        return fn

    done = await asyncio.gather(
        idempotent(pool, "a", opposite(1, 2, "a"), table=TABLE, backoff=0.2),
        idempotent(pool, "b", opposite(2, 1, "b"), table=TABLE, backoff=0.2),
    )
    assert done == ["a", "b"]
    assert len(calls) == 3, "one of the two was chosen as the deadlock victim and ran again"
    assert key_rows(fresh) == 2


class Relay:
    """A TCP relay in front of PostgreSQL (TLS passes through it untouched); ``cut()`` is a network failure."""

    def __init__(self, port: int) -> None:
        self.upstream_port = port
        self.port = 0
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> Relay:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.links.append((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for a, b in self.links:
            a.transport.abort()
            b.transport.abort()
        self.links.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def commit_in_flight(stack: DevStack, application_name: str) -> int:
    """Wait until a backend of ``application_name`` sleeps inside COMMIT; return its pid."""

    def look() -> int | None:
        with psycopg.connect(stack.superuser_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query ILIKE 'COMMIT%%' "
                "AND wait_event = 'PgSleep'",
                (application_name,),
            ).fetchone()
        return None if row is None else int(row[0])

    for _ in range(200):
        pid = await asyncio.to_thread(look)
        if pid is not None:
            return pid
        await asyncio.sleep(0.05)
    raise AssertionError("the COMMIT never reached the slow trigger")


@pytest.mark.parametrize("committed", [True, False], ids=["lost-after-commit", "lost-before-commit"])
async def test_an_ambiguous_commit_checks_the_key_before_running_again(fresh: DevStack, committed: bool) -> None:
    relay = await Relay(fresh.pg_port).start()
    url = fresh.url(via="direct").replace(f":{fresh.pg_port}/", f":{relay.port}/")
    pool = await create_pool(
        pooled_url=url, sslrootcert=str(fresh.ca_file), application_name="money-ambiguous", max_size=2
    )
    await ensure_table(pool, table=TABLE)
    calls: list[int] = []

    async def fn(conn: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            await conn.execute("SELECT set_config('money_demo.slow_commit', 'on', true)")
        await transfer("10.00", [])(conn)
        return f"attempt {len(calls)}"

    async def break_it() -> None:
        pid = await commit_in_flight(fresh, "money-ambiguous")
        if committed:
            relay.cut()  # the server finishes the COMMIT; its answer never arrives
        else:
            fresh.psql(f"SELECT pg_terminate_backend({pid})")  # the COMMIT dies with its backend

    try:
        result, _ = await asyncio.gather(idempotent(pool, "order-x", fn, table=TABLE), break_it())
    finally:
        await pool.close()
        await relay.close()
    # Either way the money moved exactly once, and fn ran again only when the first COMMIT did not happen.
    assert balances(fresh) == (decimal.Decimal("90.00"), decimal.Decimal("10.00"))
    assert key_rows(fresh) == 1
    if committed:
        assert calls == [1]
        assert result == "attempt 1"
    else:
        assert calls == [1, 1]
        assert result == "attempt 2"


async def test_bad_arguments_are_config_errors(fresh: DevStack, pooled_url: str) -> None:
    p = await create_pool(
        pooled_url=pooled_url, direct_url=fresh.direct_url, sslrootcert=str(fresh.ca_file), open=False
    )

    async def returns_a_set(conn: Any) -> Any:
        return {1, 2}

    try:
        with pytest.raises(ConfigError, match="table="):
            await idempotent(p, "k", returns_a_set, table="x; DROP TABLE y")
        with pytest.raises(ConfigError, match="key"):
            await idempotent(p, "", returns_a_set, table=TABLE)
        with pytest.raises(ConfigError, match="isolation"):
            await idempotent(p, "k", returns_a_set, table=TABLE, isolation="snapshot")  # type: ignore[arg-type]
        await ensure_table(p, table=TABLE)
        with pytest.raises(ConfigError, match="cannot be recorded as JSON"):
            await idempotent(p, "k", returns_a_set, table=TABLE)
    finally:
        await p.close()
    assert key_rows(fresh) == 0
