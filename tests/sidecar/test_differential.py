"""Concurrent differential run: 40 driver clients through the sidecar in front of PgBouncer, every answer checked.

The peers' own test suites (tests/conformance/) are concurrent only by accident. Here 40 clients run at once
through the real topology (the sidecar's upstream is the stack's PgBouncer in transaction mode, its direct URL
PostgreSQL), with the drivers' default behaviour: asyncpg with its statement cache (named statements) and
explicit ``prepare()``, psycopg with its default ``prepare_threshold`` and with ``prepare=True``, in autocommit
and in transactions. Each client runs its own deterministic mix of parametrised statements (numbers, text,
arrays, dates, numerics, several rows, writes read back in a transaction, rollbacks), with the client's number
in every parameter so an answer meant for another client cannot pass, in seven textual variants
per shape (one per client: a text is shared by every seventh client while the others prepare other
statements). The oracle is PostgreSQL itself: the same op lists run one client after another on one direct
connection per driver, and every answer through the sidecar must equal its direct answer, with zero errors.
The sidecar must also have pipelined requests across clients while doing so.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
import pytest

from poolkit.dev.devstack import DevStack

from .test_pipeline import counter

if TYPE_CHECKING:
    from .conftest import SidecarThread

Factory = Callable[..., "SidecarThread"]
CLIENTS = 40
OPS = 80
VARIANTS = 7
KINDS = ("asyncpg", "asyncpg-prepare", "psycopg", "psycopg-prepare", "psycopg-tx")

# (name, SQL with $1..$n used once each in order, params for client i, op j)
SHAPES: list[tuple[str, str, Callable[[int, int], tuple[Any, ...]]]] = [
    ("int", "SELECT $1::int * 1000 + $2::int", lambda i, j: (i, j)),
    ("text", "SELECT $1::text || ':' || $2::text", lambda i, j: (f"c{i}", f"q{j}")),
    (
        "array",
        "SELECT array_agg(g * $1::int ORDER BY g) FROM generate_series(1, $2::int) g",
        lambda i, j: (i + 1, j % 9),
    ),
    ("rows", "SELECT g, repeat($1::text, g) FROM generate_series(1, $2::int) g", lambda i, j: (f"<{i}>", 1 + j % 5)),
    ("date", "SELECT $1::bigint * 7, $2::date + $3::int", lambda i, j: (i, dt.date(2020, 1, 1), i * 10 + j)),
    ("numeric", "SELECT $1::numeric * 2, md5($2::text)", lambda i, j: (Decimal(f"{i}.{j:02d}"), f"m{i}-{j}")),
]


def psycopg_sql(sql: str) -> str:
    """The same statement with psycopg's placeholders ($1..$n appear once each, in order)."""
    for n in range(9, 0, -1):
        sql = sql.replace(f"${n}", "%s")
    return sql


def plan(i: int) -> list[tuple[str, str, tuple[Any, ...]]]:
    """Client ``i``'s ops: ``(shape or "tx"/"tx-rollback", SQL text, params)``, the same every run."""
    ops: list[tuple[str, str, tuple[Any, ...]]] = []
    for j in range(OPS):
        if j % 8 == 7:
            ops.append(("tx-rollback" if j % 16 == 15 else "tx", "", (j,)))
            continue
        name, sql, params = SHAPES[(i + j) % len(SHAPES)]
        # Clients i and i + 7 share their statement texts; each text recurs often enough for the drivers'
        # caches (asyncpg's statement cache, psycopg's prepare_threshold) to use named statements.
        ops.append((name, f"{sql} /* v{i % VARIANTS} */", params(i, j)))
    return ops


Answer = Any


def normal(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in rows]


async def run_asyncpg(
    conn: asyncpg.Connection, ops: list[tuple[str, str, tuple[Any, ...]]], key: str, table: str, *, prepare: bool
) -> list[Answer]:
    answers: list[Answer] = []
    statements: dict[str, Any] = {}
    for name, sql, params in ops:
        if name.startswith("tx"):
            tx = conn.transaction()
            await tx.start()
            await conn.execute(f"INSERT INTO {table} (k, v) VALUES ($1, $2)", key, params[0])
            row = await conn.fetchrow(f"SELECT count(*), coalesce(sum(v), 0) FROM {table} WHERE k = $1", key)
            answers.append(tuple(row))
            await (tx.rollback() if name == "tx-rollback" else tx.commit())
        elif prepare:
            statement = statements.get(sql) or await conn.prepare(sql)
            statements[sql] = statement
            answers.append(normal(await statement.fetch(*params)))
        else:
            answers.append(normal(await conn.fetch(sql, *params)))
    return answers


async def run_psycopg(
    conn: psycopg.AsyncConnection[Any],
    ops: list[tuple[str, str, tuple[Any, ...]]],
    key: str,
    table: str,
    *,
    prepare: bool | None,
) -> list[Answer]:
    answers: list[Answer] = []
    for name, sql, params in ops:
        if name.startswith("tx"):
            async with conn.transaction(force_rollback=name == "tx-rollback"):
                await conn.execute(f"INSERT INTO {table} (k, v) VALUES (%s, %s)", (key, params[0]))
                cur = await conn.execute(f"SELECT count(*), coalesce(sum(v), 0) FROM {table} WHERE k = %s", (key,))
                answers.append(tuple(await cur.fetchone() or ()))
        else:
            cur = await conn.execute(psycopg_sql(sql), params, prepare=prepare)
            answers.append(normal(await cur.fetchall()))
            if not conn.autocommit:
                await conn.commit()  # one unit of work per transaction, as an app outside autocommit does
    return answers


def runner(kind: str) -> Callable[[Any, list[tuple[str, str, tuple[Any, ...]]], str, str], Awaitable[list[Answer]]]:
    async def run(conn: Any, ops: list[tuple[str, str, tuple[Any, ...]]], key: str, table: str) -> list[Answer]:
        if kind.startswith("asyncpg"):
            return await run_asyncpg(conn, ops, key, table, prepare=kind == "asyncpg-prepare")
        return await run_psycopg(conn, ops, key, table, prepare=True if kind == "psycopg-prepare" else None)

    return run


async def connect(kind: str, url: str) -> Any:
    """A client with the driver's defaults (asyncpg's statement cache, psycopg's prepare_threshold)."""
    if kind.startswith("asyncpg"):
        return await asyncpg.connect(url)
    # psycopg-tx runs outside autocommit: psycopg opens each op's transaction with BEGIN.
    return await psycopg.AsyncConnection.connect(url, autocommit=kind != "psycopg-tx")


async def close(kind: str, conn: Any) -> None:
    if kind.startswith("asyncpg"):
        await conn.close()
    else:
        await conn.close()


@pytest.mark.slow
async def test_many_driver_clients_through_the_sidecar_get_exactly_their_direct_answers(
    sidecar_factory: Factory, stack: DevStack
) -> None:
    sidecar = sidecar_factory(pooled_url=stack.url(via="pgbouncer", sslmode="verify-full"), upstream="pooled")
    table = f"diff_{secrets.token_hex(4)}"
    async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as setup:
        await setup.execute(f"CREATE TABLE {table} (k text NOT NULL, v int NOT NULL)")
    try:
        plans = [plan(i) for i in range(CLIENTS)]
        kinds = [KINDS[i % len(KINDS)] for i in range(CLIENTS)]

        # The oracle: each client's ops on one direct connection per driver kind, one client after another.
        expected: list[list[Answer]] = []
        direct: dict[str, Any] = {}
        try:
            for i in range(CLIENTS):
                conn = direct.get(kinds[i]) or await connect(kinds[i], stack.direct_url)
                direct[kinds[i]] = conn
                expected.append(await runner(kinds[i])(conn, plans[i], f"direct-{i}", table))
        finally:
            for kind, conn in direct.items():
                await close(kind, conn)

        url = sidecar.url()
        go = asyncio.Event()

        async def client(i: int) -> list[Answer]:
            conn = await connect(kinds[i], url)
            try:
                await go.wait()
                return await runner(kinds[i])(conn, plans[i], f"sidecar-{i}", table)
            finally:
                await close(kinds[i], conn)

        tasks = [asyncio.get_running_loop().create_task(client(i)) for i in range(CLIENTS)]
        await asyncio.sleep(0)
        go.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=180)

        errors = [(i, kinds[i], repr(o)[:300]) for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        wrong: list[str] = []
        for i, got in enumerate(outcomes):
            if isinstance(got, BaseException):
                continue
            for j, (answer, want) in enumerate(zip(got, expected[i], strict=True)):
                if answer != want:
                    wrong.append(f"client {i} ({kinds[i]}) op {j} {plans[i][j][0]}: got {answer!r}, direct {want!r}")
        answered = sum(len(o) for o in outcomes if not isinstance(o, BaseException))
        assert not errors and not wrong, (
            f"{len(errors)} of {CLIENTS} clients failed and {len(wrong)} of {answered} answers differ from direct:\n"
            + "\n".join(f"  client {i} ({kind}): {text}" for i, kind, text in errors[:15])
            + ("\n" if errors else "")
            + "\n".join(f"  {line}" for line in wrong[:15])
        )
        assert answered == CLIENTS * OPS

        # What was committed: each client's own rows, through the sidecar exactly as direct.
        async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as check:
            cur = await check.execute(f"SELECT k, count(*), sum(v) FROM {table} GROUP BY k ORDER BY k")
            rows = {k: (n, s) for k, n, s in await cur.fetchall()}
        for i in range(CLIENTS):
            assert rows.get(f"sidecar-{i}") == rows.get(f"direct-{i}"), f"client {i}'s committed rows"
        assert counter(sidecar, "pipelined_requests") > 0, "no request was pipelined across clients"
    finally:
        async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as cleanup:
            await cleanup.execute(f"DROP TABLE IF EXISTS {table}")
