"""Pipelining across clients (``pipeline_depth``): answers, isolation, settings, disconnects, cancels, a lost server.

Every test runs one server connection (max_size=1) in front of the stack's PostgreSQL, so all clients
provably share one backend. Requests that must stay queued are made to by locks, never by timing: a
holder client keeps the server in a transaction while the others line up as waiters (``pool.waiters``);
when it commits, the first waiter gets the server and the next ones are written behind it (the
pipelined counter says how many), and the head's ``SELECT`` waits on a table a direct connection has
locked until the test lets it go. (A request arriving while the head has already run for a while may
wait rather than be pipelined; the line-up works either way.)

psycopg (autocommit, prepare_threshold=None) sends one unnamed Parse/Bind/Describe/Execute/Sync batch
for a query with parameters, one simple Query for a query without (or through a ClientCursor): both are
eligible. asyncpg's first round trip per query is Parse/Describe/Flush (no Sync): its clients take the
server for themselves, so they are in the load tests as the other kind of neighbour, not as pipelined requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
import pytest

from poolkit.dev.devstack import DevStack, find_pg_binary
from poolkit.sidecar.wire import protocol as p

from .conftest import run
from .test_ops import samples

if TYPE_CHECKING:
    from .conftest import SidecarThread

Factory = Callable[..., "SidecarThread"]
AConn = psycopg.AsyncConnection[tuple[Any, ...]]
APP_NAME = "pk-pipe"  # every client of a test has the same startup settings, so the same server suits them all
WAIT = 20.0  # generous bound for anything the tests wait on (a loaded 2-core machine)


# ---------------------------------------------------------------- helpers


def counter(sidecar: SidecarThread, name: str) -> float:
    """``poolkit_sidecar_<name>_total`` for the sidecar's pool, as /metrics shows it."""
    pool = sidecar.call(lambda app: app.pool.name)
    key = (f"poolkit_sidecar_{name}_total", (("pool", pool),))
    metrics = samples(sidecar.metrics_url)
    assert key in metrics, f"/metrics has no {key[0]}{{pool={pool!r}}}"
    return metrics[key]


async def eventually(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


async def eventually_async(read: Callable[[], Any], expected: Any, what: str, timeout: float = WAIT) -> None:
    """Poll the coroutine ``read()`` until it returns ``expected``; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (got := await read()) != expected:
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what} (last: {got!r})"
        await asyncio.sleep(0.01)


def waiters(sidecar: SidecarThread) -> int:
    return sidecar.call(lambda app: len(app.pool.waiters))


def server_pids(sidecar: SidecarThread) -> list[int]:
    return sidecar.call(lambda app: [s.backend_pid for s in app.pool.servers])


async def connect(
    sidecar: SidecarThread, *, simple: bool = False, autocommit: bool = True, prepare_threshold: int | None = None
) -> AConn:
    """A psycopg client of the sidecar; ``simple`` binds parameters client-side (simple Query protocol).

    With the default ``prepare_threshold=None`` psycopg never names a statement (``prepare=True`` too).
    """
    factory: Any = psycopg.AsyncClientCursor if simple else psycopg.AsyncCursor
    return await psycopg.AsyncConnection.connect(
        sidecar.url(application_name=APP_NAME),
        autocommit=autocommit,
        prepare_threshold=prepare_threshold,
        cursor_factory=factory,
    )


async def value(conn: AConn, sql: str, *params: Any) -> Any:
    cur = await conn.execute(sql, params or None)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def holder(sidecar: SidecarThread) -> AConn:
    """A client that holds the only server in a transaction: what arrives now waits in line."""
    conn = await connect(sidecar, autocommit=False)
    assert await value(conn, "SELECT 1") == 1
    assert waiters(sidecar) == 0
    return conn


def start(conn: AConn, sql: str, *params: Any) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(value(conn, sql, *params))


async def line_up(sidecar: SidecarThread, task: asyncio.Task[Any]) -> None:
    """Wait until ``task``'s request is in the pool's waiting line (so the order of the line is known)."""
    before = waiters(sidecar)
    await eventually(lambda: waiters(sidecar) > before or task.done(), "a request to join the waiting line")
    assert not task.done(), f"a request that should have waited finished: {task}"


async def queue_behind_first(
    sidecar: SidecarThread, hold: AConn, requests: list[tuple[AConn, str, tuple[Any, ...]]]
) -> list[asyncio.Task[Any]]:
    """Queue the requests in order while ``hold`` keeps the server; once it commits the first runs and
    the others are written behind it (pipelined). Returns their tasks."""
    tasks: list[asyncio.Task[Any]] = []
    for conn, sql, params in requests:
        task = start(conn, sql, *params)
        await line_up(sidecar, task)
        tasks.append(task)
    base = counter(sidecar, "pipelined_requests")
    await hold.commit()
    behind = len(requests) - 1
    await eventually(lambda: counter(sidecar, "pipelined_requests") == base + behind, "the rest behind the first")
    return tasks


@contextlib.asynccontextmanager
async def locked(stack: DevStack, table: str, rows: int) -> AsyncIterator[Callable[[], Any]]:
    """``table`` with ``rows`` rows, locked by a direct connection; yields a coroutine function that unlocks it."""
    async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as setup:
        await setup.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (x int)")
        await setup.execute(f"INSERT INTO {table} SELECT generate_series(1, {rows})")
    lock = await psycopg.AsyncConnection.connect(stack.direct_url)
    try:
        await lock.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

        async def release() -> None:
            if not lock.closed:
                await lock.rollback()

        yield release
    finally:
        await lock.close()


def shut_socket(conn: AConn) -> None:
    """Close a client's TCP connection under it, as a crashed process would (no Terminate message)."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()


async def close_all(*conns: AConn) -> None:
    for conn in conns:
        with contextlib.suppress(psycopg.Error):
            await conn.close()


# ---------------------------------------------------------------- 1. correctness under load


@pytest.mark.parametrize("depth", [16, 0])
async def test_every_answer_reaches_its_own_client_under_load(
    sidecar_factory: Factory, stack: DevStack, depth: int
) -> None:
    sidecar = sidecar_factory(max_size=1, pipeline_depth=depth)
    app_name = f"pk-pipe-load-{depth}"
    url = sidecar.url(application_name=app_name)
    clients, queries = 40, 50
    go = asyncio.Event()

    async def one(i: int) -> list[tuple[int, str]]:
        got: list[tuple[int, str]] = []
        if i % 3 == 0:  # asyncpg, unnamed statements: takes the server for itself between pipelines
            conn = await asyncpg.connect(url, statement_cache_size=0)
            try:
                await go.wait()
                for j in range(queries):
                    row = await conn.fetchrow("SELECT $1::int * 2, $2::text", i * 1000 + j, f"c{i}-q{j}")
                    assert row is not None
                    got.append((row[0], row[1]))
            finally:
                await conn.close()
            return got
        factory: Any = psycopg.AsyncClientCursor if i % 3 == 1 else psycopg.AsyncCursor
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, prepare_threshold=None, cursor_factory=factory
        ) as pconn:
            await go.wait()
            for j in range(queries):
                cur = await pconn.execute("SELECT %s::int * 2, %s::text", (i * 1000 + j, f"c{i}-q{j}"))
                prow = await cur.fetchone()
                assert prow is not None
                got.append((prow[0], prow[1]))
        return got

    seen_pids: set[int] = set()
    done = asyncio.Event()

    async def watch_backends() -> None:
        # What PostgreSQL sees while the load runs: the backends carrying this test's application_name.
        async with await psycopg.AsyncConnection.connect(stack.superuser_url, autocommit=True) as watcher:
            while not done.is_set():
                cur = await watcher.execute(
                    "SELECT pid FROM pg_stat_activity WHERE usename = %s AND application_name = %s",
                    (stack.app_user, app_name),
                )
                seen_pids.update(row[0] for row in await cur.fetchall())
                await asyncio.sleep(0.02)

    watcher = asyncio.get_running_loop().create_task(watch_backends())
    tasks = [asyncio.get_running_loop().create_task(one(i)) for i in range(clients)]
    await eventually(lambda: sidecar.call(lambda app: len(app.connections)) >= clients, "every client to log in")
    go.set()
    try:
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    finally:
        done.set()
        await watcher
    for i, got in enumerate(results):
        assert got == [((i * 1000 + j) * 2, f"c{i}-q{j}") for j in range(queries)], f"client {i}"
    assert len(seen_pids) == 1, f"backends seen for {app_name}: {seen_pids}"
    assert server_pids(sidecar) == list(seen_pids)
    pipelined = counter(sidecar, "pipelined_requests")
    if depth:
        assert pipelined > 0
    else:
        assert pipelined == 0  # pipeline_depth=0: every request waits for a server of its own


# ---------------------------------------------------------------- 2. isolation from transactions


async def test_readers_never_see_or_join_another_clients_transaction(sidecar_factory: Factory, stack: DevStack) -> None:
    table = "pipe_iso"
    async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as setup:
        await setup.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (x int)")
    sidecar = sidecar_factory(max_size=1)
    url = sidecar.url(application_name=APP_NAME)
    writers_done = asyncio.Event()

    async def psycopg_writer(i: int) -> int:
        async with await connect(sidecar, autocommit=False) as conn:  # BEGIN before the INSERT
            for _ in range(12):
                await conn.execute(f"INSERT INTO {table} VALUES (%s)", (i,))
                # An eligible statement, but inside a transaction: nobody may queue behind it.
                assert await value(conn, "SELECT count(*) FROM generate_series(1, %s::int)", 20_000) == 20_000
                assert await value(conn, f"SELECT count(*) FROM {table}") == 1  # its own row, not yet committed
                await conn.rollback()
        return i

    async def asyncpg_writer(i: int) -> int:
        conn = await asyncpg.connect(url, statement_cache_size=0)
        try:
            for _ in range(12):
                await conn.execute(f"BEGIN; INSERT INTO {table} VALUES ({i})")  # one simple Query, two statements
                assert await conn.fetchval("SELECT count(*) FROM generate_series(1, $1::int)", 20_000) == 20_000
                await conn.execute("ROLLBACK")
        finally:
            await conn.close()
        return i

    async def reader(i: int) -> list[int]:
        counts: list[int] = []
        async with await connect(sidecar, simple=i % 2 == 0) as conn:
            while not writers_done.is_set() or len(counts) < 20:
                counts.append(await value(conn, f"SELECT count(*) FROM {table} WHERE x >= %s", -i))
        return counts

    loop = asyncio.get_running_loop()
    readers = [loop.create_task(reader(i)) for i in range(12)]
    writers = [loop.create_task(psycopg_writer(100 + i)) for i in range(2)]
    writers += [loop.create_task(asyncpg_writer(200 + i)) for i in range(2)]
    try:
        await asyncio.wait_for(asyncio.gather(*writers), timeout=120)
    finally:
        writers_done.set()
    counts = await asyncio.wait_for(asyncio.gather(*readers), timeout=60)
    assert all(len(c) >= 20 for c in counts)
    assert {n for c in counts for n in c} == {0}  # never a row of a transaction that was rolled back
    assert counter(sidecar, "pipelined_requests") > 0  # the readers did queue behind each other
    async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as check:
        assert await value(check, f"SELECT count(*) FROM {table}") == 0


# ---------------------------------------------------------------- 3. startup settings


async def test_each_client_keeps_its_own_startup_time_zone(
    sidecar_factory: Factory, stack: DevStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    sidecar = sidecar_factory(max_size=1)
    async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as direct:
        default = await value(direct, "SHOW TimeZone")
    zones = ["Europe/Berlin", "Asia/Tokyo"]
    assert default not in zones
    groups: list[tuple[str, AConn]] = []
    # libpq sends PGTZ as the "timezone" startup parameter (the sidecar refuses ``options``); it is read
    # when a connection starts, so each group connects with its own value.
    for zone in zones:
        monkeypatch.setenv("PGTZ", zone)
        groups += [(zone, await connect(sidecar, simple=k % 2 == 0)) for k in range(6)]
    monkeypatch.delenv("PGTZ")
    groups += [(default, await connect(sidecar, simple=k % 2 == 0)) for k in range(4)]
    # asyncpg's TimeZone server setting goes in its startup packet too.
    others = [
        await asyncpg.connect(
            sidecar.url(application_name=APP_NAME), statement_cache_size=0, server_settings={"TimeZone": "UTC"}
        )
        for _ in range(3)
    ]

    async def psycopg_client(zone: str, conn: AConn) -> set[str]:
        seen: set[str] = set()
        for j in range(40):
            if j % 2:
                seen.add(await value(conn, "SELECT current_setting(%s)", "TimeZone"))
            else:
                seen.add(await value(conn, "SELECT current_setting('TimeZone')"))
        return seen

    async def asyncpg_client(conn: asyncpg.Connection) -> set[str]:
        return {await conn.fetchval("SELECT current_setting('TimeZone')") for _ in range(20)}

    try:
        seen = await asyncio.wait_for(
            asyncio.gather(
                *(psycopg_client(zone, conn) for zone, conn in groups),
                *(asyncpg_client(conn) for conn in others),
            ),
            timeout=120,
        )
    finally:
        await close_all(*(conn for _, conn in groups))
        for other in others:
            await other.close()
    expected = [{zone} for zone, _ in groups] + [{"UTC"}] * len(others)
    assert seen == expected
    assert counter(sidecar, "pipelined_requests") > 0


# ---------------------------------------------------------------- what may not queue behind another client


@pytest.mark.parametrize(
    ("sql", "params", "prepare", "expected"),
    [
        pytest.param("SELECT %s::text", ("x" * 9000,), False, "x" * 9000, id="over-8KiB"),
        pytest.param("SELECT %s::int * 2", (21,), True, 42, id="named-statement"),
        pytest.param("SELECT 42 FROM pg_catalog.pg_database LIMIT %s", (1,), False, 42, id="catalog"),
        pytest.param("SELECT 42; SELECT 1", (), False, 42, id="two-statements"),
        pytest.param("SELECT set_config('pipe.x', %s, false)::int", ("42",), False, 42, id="session-effect"),
    ],
)
async def test_an_ineligible_request_waits_for_the_server(  # noqa: PLR0917 - one argument per parametrize column
    sidecar_factory: Factory, stack: DevStack, sql: str, params: tuple[Any, ...], prepare: bool, expected: Any
) -> None:
    sidecar = sidecar_factory(max_size=1)
    async with locked(stack, "pipe_wait", rows=3) as release:
        hold = await holder(sidecar)
        a, b = await connect(sidecar), await connect(sidecar, prepare_threshold=0 if prepare else None)
        task_a = start(a, "SELECT count(*) FROM pipe_wait")
        await line_up(sidecar, task_a)

        async def run_b() -> Any:
            cur = await b.execute(sql, params or None, prepare=prepare)
            row = await cur.fetchone()
            assert row is not None
            return row[0]

        task_b = asyncio.get_running_loop().create_task(run_b())
        await line_up(sidecar, task_b)
        base = counter(sidecar, "pipelined_requests")
        await hold.commit()  # A gets the server (and, within one callback, whatever may queue behind it)
        assert counter(sidecar, "pipelined_requests") == base  # B waits for the server to come back
        await release()
        assert await asyncio.wait_for(task_a, WAIT) == 3
        assert await asyncio.wait_for(task_b, WAIT) == expected
        assert counter(sidecar, "pipelined_requests") == base
        await close_all(hold, a, b)


# ---------------------------------------------------------------- 4. a pipelined client disconnects


async def test_a_pipelined_client_that_disconnects_loses_only_its_answer(
    sidecar_factory: Factory, stack: DevStack
) -> None:
    sidecar = sidecar_factory(max_size=1)
    async with locked(stack, "pipe_gone", rows=3) as release:
        hold = await holder(sidecar)
        [pid] = server_pids(sidecar)
        conns = [await connect(sidecar, simple=k % 2 == 1) for k in range(6)]
        head = start(conns[0], "SELECT count(*) FROM pipe_gone")  # waits on the lock once it runs
        await line_up(sidecar, head)
        pipelined = []
        for k, conn in enumerate(conns[1:], start=1):
            pipelined.append(start(conn, "SELECT %s::int * 2", k))
            await line_up(sidecar, pipelined[-1])
        base = counter(sidecar, "pipelined_requests")
        await hold.commit()  # the head gets the server; the five others are written behind it
        await eventually(lambda: counter(sidecar, "pipelined_requests") == base + 5, "five pipelined requests")
        clients = sidecar.call(lambda app: len(app.connections))
        shut_socket(conns[2])  # the second pipelined client goes away while queued
        await eventually(lambda: sidecar.call(lambda app: len(app.connections)) == clients - 1, "the client to go")
        await release()
        assert await asyncio.wait_for(head, WAIT) == 3
        for k, task in enumerate(pipelined, start=1):
            if k == 2:
                with pytest.raises(psycopg.OperationalError):
                    await asyncio.wait_for(task, WAIT)
            else:
                assert await asyncio.wait_for(task, WAIT) == 2 * k
        await close_all(hold, *conns)
    async with await connect(sidecar) as again:
        assert await value(again, "SELECT %s::int * 2", 21) == 42
    assert server_pids(sidecar) == [pid]  # the same backend served on: it was never closed


# ---------------------------------------------------------------- 5. cancels


def held_cancels(sidecar: SidecarThread) -> int:
    """Cancels the sidecar keeps until their client's request is at the head of its pipeline."""
    return sidecar.call(lambda app: sum(len(c.pipeline.cancel_held or ()) for c in list(app.connections)))


async def test_a_cancel_for_a_queued_client_never_fails_the_client_behind_it(
    sidecar_factory: Factory, stack: DevStack
) -> None:
    sidecar = sidecar_factory(max_size=1)
    async with locked(stack, "pipe_head", rows=5) as release_head, locked(stack, "pipe_tail", rows=7) as release_tail:
        hold = await holder(sidecar)
        a, b, c = [await connect(sidecar) for _ in range(3)]
        retries = counter(sidecar, "pipeline_retries")
        task_a, task_b, task_c = await queue_behind_first(
            sidecar,
            hold,
            [
                (a, "SELECT count(*) FROM pipe_head", ()),
                (b, "SELECT %s::int * 2", (21,)),
                (c, "SELECT count(*) FROM pipe_tail WHERE x > %s", (0,)),
            ],
        )
        canceling = asyncio.get_running_loop().create_task(b.cancel_safe(timeout=WAIT))
        await eventually(lambda: held_cancels(sidecar) == 1, "the sidecar to hold B's cancel")
        await release_head()  # A ends, B is at the head: its cancel goes to PostgreSQL now
        assert await asyncio.wait_for(task_a, WAIT) == 5
        try:
            b_answer: Any = await asyncio.wait_for(task_b, WAIT)
        except psycopg.errors.QueryCanceled as exc:
            b_answer = exc
        if b_answer == 42:
            # B was done before the cancel arrived: it hit C, which waits on the lock, and was sent again.
            await eventually(lambda: counter(sidecar, "pipeline_retries") >= retries + 1, "C to be re-sent")
        else:
            assert isinstance(b_answer, psycopg.errors.QueryCanceled), b_answer
        await release_tail()
        assert await asyncio.wait_for(task_c, WAIT) == 7  # never a 57014 meant for B
        await asyncio.wait_for(canceling, WAIT)
        assert await value(b, "SELECT %s::int * 3", 3) == 9  # B's session is fine either way
        await close_all(hold, a, b, c)


async def test_a_cancel_for_the_head_cancels_only_the_head(sidecar_factory: Factory, stack: DevStack) -> None:
    sidecar = sidecar_factory(max_size=1)
    async with locked(stack, "pipe_head", rows=5) as release:
        hold = await holder(sidecar)
        a, b, c = [await connect(sidecar, simple=k == 2) for k in range(3)]
        retries = counter(sidecar, "pipeline_retries")
        task_a, task_b, task_c = await queue_behind_first(
            sidecar,
            hold,
            [
                (a, "SELECT count(*) FROM pipe_head", ()),
                (b, "SELECT %s::int * 2", (21,)),
                (c, "SELECT %s::int * 3", (7,)),
            ],
        )
        await asyncio.wait_for(a.cancel_safe(timeout=WAIT), WAIT)
        with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement due to user request"):
            await asyncio.wait_for(task_a, WAIT)
        assert await asyncio.wait_for(task_b, WAIT) == 42
        assert await asyncio.wait_for(task_c, WAIT) == 21
        assert counter(sidecar, "pipeline_retries") == retries  # the cancel hit A, where it was meant to
        await release()
        assert await value(a, "SELECT count(*) FROM pipe_head") == 5  # A's session carries on
        await close_all(hold, a, b, c)


# ---------------------------------------------------------------- 6. the server is lost


async def test_a_lost_server_fails_every_client_in_its_pipeline(sidecar_factory: Factory, stack: DevStack) -> None:
    sidecar = sidecar_factory(max_size=1)
    async with locked(stack, "pipe_lost", rows=2) as release:
        hold = await holder(sidecar)
        [pid] = server_pids(sidecar)
        conns = [await connect(sidecar, simple=k % 2 == 1) for k in range(4)]
        tasks = [start(conns[0], "SELECT count(*) FROM pipe_lost")]
        await line_up(sidecar, tasks[0])
        for k, conn in enumerate(conns[1:], start=1):
            tasks.append(start(conn, "SELECT %s::int * 2", k))
            await line_up(sidecar, tasks[-1])
        base = counter(sidecar, "pipelined_requests")
        await hold.commit()
        await eventually(lambda: counter(sidecar, "pipelined_requests") == base + 3, "three pipelined requests")
        async with await psycopg.AsyncConnection.connect(stack.superuser_url, autocommit=True) as admin:
            assert await value(admin, "SELECT pg_terminate_backend(%s)", pid) is True
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        head, *behind = outcomes
        assert isinstance(head, psycopg.errors.AdminShutdown), head  # PostgreSQL's own FATAL, relayed
        for outcome in behind:  # the sidecar's, for the requests PostgreSQL never answered
            assert isinstance(outcome, psycopg.errors.ConnectionFailure), outcome
            assert "was lost" in str(outcome)
        await release()
        await close_all(hold, *conns)
    async with await connect(sidecar) as again:
        assert await value(again, "SELECT %s::int * 2", 21) == 42
    assert server_pids(sidecar) not in ([], [pid])  # a new backend


# ---------------------------------------------------------------- 7. more bytes from a queued client


class RawClient:
    """A protocol-3 client on an asyncio stream, to send a second request before the first one's answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.messages = p.MessageReader(side="server", max_message_size=1 << 24)
        self.inbox: list[tuple[bytes, bytes]] = []

    @classmethod
    async def connect(cls, sidecar: SidecarThread) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        # What libpq sends for sidecar.url(application_name=APP_NAME): the same settings as the psycopg clients.
        writer.write(p.startup_message({"user": "app", "database": "app", "application_name": APP_NAME}))
        raw = cls(reader, writer)
        await raw.answer()
        return raw

    def send(self, sql: str) -> None:
        self.writer.write(p.query(sql))

    async def answer(self) -> tuple[list[str], str]:
        """The next answer, up to its ReadyForQuery: (its values and command tags and errors, its status)."""
        got: list[str] = []
        while True:
            while self.inbox:
                kind, body = self.inbox.pop(0)
                if kind == b"D":
                    length = int.from_bytes(body[2:6], "big")
                    got.append(body[6 : 6 + length].decode())
                elif kind == b"C":
                    got.append(body.rstrip(b"\x00").decode())
                elif kind == b"E":
                    got.append("ERROR " + p.parse_error_fields(body)["C"])
                elif kind == b"Z":
                    return got, body.decode()
            data = await self.reader.read(65536)
            assert data, f"the sidecar closed the connection; got {got}"
            self.inbox.extend(self.messages.feed(data))

    async def close(self) -> None:
        self.writer.write(b"X\x00\x00\x00\x04")
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def deferred_bytes(sidecar: SidecarThread) -> int:
    """Bytes the sidecar holds for clients in a pipeline until their answer is complete."""
    return sidecar.call(lambda app: sum(c.buffered for c in list(app.connections) if c.deferring))


async def test_what_a_queued_client_sends_next_waits_for_its_answer(sidecar_factory: Factory, stack: DevStack) -> None:
    sidecar = sidecar_factory(max_size=1)
    async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as setup:
        await setup.execute("DROP TABLE IF EXISTS pipe_later; CREATE TABLE pipe_later (x int)")
    async with locked(stack, "pipe_first", rows=4) as release:
        hold = await holder(sidecar)
        a, g = await connect(sidecar), await connect(sidecar, simple=True)
        task_a = start(a, "SELECT count(*) FROM pipe_first")
        await line_up(sidecar, task_a)
        f = await RawClient.connect(sidecar)
        before = waiters(sidecar)
        f.send("SELECT 6 * 7")
        await eventually(lambda: waiters(sidecar) > before, "F's request to join the waiting line")
        task_g = start(g, "SELECT count(*) FROM pipe_later WHERE x > %s", 0)
        await line_up(sidecar, task_g)
        base = counter(sidecar, "pipelined_requests")
        await hold.commit()
        await eventually(lambda: counter(sidecar, "pipelined_requests") == base + 2, "F and G behind A")
        # F does not wait for its answer: a transaction follows. It must not run before G's request,
        # nor inside the line: it waits for F's answer, then gets the server as a transaction of its own.
        f.send("BEGIN; INSERT INTO pipe_later VALUES (1)")
        await eventually(lambda: deferred_bytes(sidecar) > 0, "the sidecar to hold F's next request")
        await release()
        assert await asyncio.wait_for(task_a, WAIT) == 4
        assert await asyncio.wait_for(f.answer(), WAIT) == (["42", "SELECT 1"], "I")
        assert await asyncio.wait_for(f.answer(), WAIT) == (["BEGIN", "INSERT 0 1"], "T")
        assert await asyncio.wait_for(task_g, WAIT) == 0  # G's answer is G's, from before F's transaction
        f.send("SELECT count(*) FROM pipe_later")
        assert await asyncio.wait_for(f.answer(), WAIT) == (["1", "SELECT 1"], "T")
        # F's transaction has the server to itself: a reader waits for it rather than running inside it.
        reader = start(a, "SELECT count(*) FROM pipe_later WHERE x > %s", 0)
        await line_up(sidecar, reader)
        f.send("ROLLBACK")
        assert await asyncio.wait_for(f.answer(), WAIT) == (["ROLLBACK"], "I")
        assert await asyncio.wait_for(reader, WAIT) == 0
        await f.close()
        await close_all(hold, a, g)
    async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as check:
        assert await value(check, "SELECT count(*) FROM pipe_later") == 0


# ---------------------------------------------------------------- 8. pgbench


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only_through_one_server(sidecar_factory: Factory, pgbench_tables: None, mode: str) -> None:
    sidecar = sidecar_factory(max_size=1)
    pgbench = str(find_pg_binary("pgbench"))
    done = run([pgbench, "-n", "-S", "-M", mode, "-c", "20", "-j", "2", "-T", "3", sidecar.url()])
    assert done.returncode == 0, done.stderr
    assert "number of failed transactions: 0 " in done.stdout, done.stdout
    assert counter(sidecar, "pipelined_requests") > 0
    assert len(server_pids(sidecar)) == 1


async def test_named_prepared_statements_queue_once_the_server_has_them(sidecar_factory: Factory) -> None:
    """asyncpg's statement cache and psycopg's prepared statements: Bind/Execute/Sync of a statement the
    server connection already has is only renamed, so it may queue; every answer is still its client's."""
    sidecar = sidecar_factory(max_size=1)
    url = sidecar.url()
    clients, queries = 24, 40
    go = asyncio.Event()

    async def one(i: int) -> list[int]:
        got: list[int] = []
        if i % 2 == 0:  # asyncpg with its default statement cache (named statements)
            conn = await asyncpg.connect(url)
            try:
                await go.wait()
                for j in range(queries):
                    got.append(await conn.fetchval("SELECT $1::int * 3", i * 1000 + j))
            finally:
                await conn.close()
            return got
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=0) as pconn:
            await go.wait()
            for j in range(queries):
                cur = await pconn.execute("SELECT %s::int * 3", (i * 1000 + j,))
                row = await cur.fetchone()
                assert row is not None
                got.append(row[0])
        return got

    tasks = [asyncio.get_running_loop().create_task(one(i)) for i in range(clients)]
    await eventually(lambda: sidecar.call(lambda app: len(app.connections)) >= clients, "every client to log in")
    go.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    for i, got in enumerate(results):
        assert got == [(i * 1000 + j) * 3 for j in range(queries)], f"client {i}"
    assert counter(sidecar, "pipelined_requests") > 0
    assert len(server_pids(sidecar)) == 1


# ---------------------------------------------------------------- 9. requests that arrive together


@contextlib.asynccontextmanager
async def one_turn(sidecar: SidecarThread, count: int) -> AsyncIterator[None]:
    """Hold the sidecar's event loop still while the body sends; it resumes once ``count`` client sockets
    have bytes to read, so that one turn of the loop reads every request (no timing involved)."""
    assert sidecar.loop is not None
    entered, release = threading.Event(), threading.Event()
    ready: list[int] = []

    def hold() -> None:  # runs on the sidecar's loop
        entered.set()
        release.wait(WAIT)
        sockets = [c.transport.get_extra_info("socket") for c in list(sidecar.app.connections)]  # type: ignore[union-attr]
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            readable = select.select(sockets, [], [], 0.01)[0]
            if len(readable) >= count:
                break
        ready.append(len(readable))

    sidecar.loop.call_soon_threadsafe(hold)
    assert await asyncio.to_thread(entered.wait, WAIT), "the sidecar's loop never ran the hold"
    try:
        yield
    finally:
        release.set()
    await eventually(lambda: bool(ready), "the sidecar's loop to go on")
    assert ready == [count], f"{ready[0]} client sockets were readable at once, not {count}"


async def burst(sidecar: SidecarThread, stack: DevStack, clients: list[RawClient], sql: str) -> int:
    """Every client sends ``sql`` in one turn of the sidecar's loop; how many backends ran it (pg_stat_activity).

    ``sql`` ends in a number unique to the burst: its shape (shapes.py) is the same from burst to burst.
    """
    async with one_turn(sidecar, len(clients)):
        for client in clients:
            client.send(sql)
    for client in clients:
        got, status = await asyncio.wait_for(client.answer(), WAIT)
        assert status == "I" and got[-1] == "SELECT 1", got
    async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as check:
        return int(await value(check, "SELECT count(*) FROM pg_stat_activity WHERE query = %s", sql))


def quick(sidecar: SidecarThread, shape: str) -> bool:
    return sidecar.call(lambda app: app.pool.times.quick(shape.encode()))


async def test_quick_requests_that_arrive_together_share_one_server_connection(
    sidecar_factory: Factory, stack: DevStack
) -> None:
    """While other server connections are idle, requests that arrive in one turn share one write (one
    backend) only if their statement is known to run quickly; slow or unknown ones each take a connection."""
    sidecar = sidecar_factory(max_size=3)
    clients = [await RawClient.connect(sidecar) for _ in range(6)]
    for client in clients[:3]:  # three transactions at once: three server connections
        client.send("BEGIN")
        assert await asyncio.wait_for(client.answer(), WAIT) == (["BEGIN"], "T")
    for client in clients[:3]:
        client.send("COMMIT")
        assert await asyncio.wait_for(client.answer(), WAIT) == (["COMMIT"], "I")
    assert len(server_pids(sidecar)) == 3

    fast, slow = "SELECT 1 AS burst_", "SELECT count(*) FROM generate_series(1, 200000) AS burst_"
    bursts = iter(range(1, 1000))
    # Unknown shapes spread over the idle connections; the three that find none queue behind, which
    # times them (the gap between two answers on one connection is PostgreSQL's time, without the trip).
    for shape in (fast, slow):
        base = counter(sidecar, "pipelined_requests")
        assert await burst(sidecar, stack, clients, f"{shape}{next(bursts)}") == 3, f"{shape}: unknown, yet queued"
        assert counter(sidecar, "pipelined_requests") == base + 3
    for _ in range(20):  # on a loaded machine one run may be slow: its shape is quick again after some more
        if quick(sidecar, fast):
            break
        await burst(sidecar, stack, clients, f"{fast}{next(bursts)}")
    assert quick(sidecar, fast)
    assert not quick(sidecar, slow)

    base = counter(sidecar, "pipelined_requests")
    assert await burst(sidecar, stack, clients, f"{fast}{next(bursts)}") == 1, "quick requests did not share a write"
    assert counter(sidecar, "pipelined_requests") == base + 5
    # The same burst of a slow statement: nobody waits behind it while a connection is idle.
    base = counter(sidecar, "pipelined_requests")
    assert await burst(sidecar, stack, clients[:3], f"{slow}{next(bursts)}") == 3, "slow requests queued"
    assert counter(sidecar, "pipelined_requests") == base

    # Pipelining while a connection is idle stays within one turn: a quick statement that turns slow (it
    # waits for a lock) holds up nobody who arrives later while a connection is idle.
    async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as setup:
        await setup.execute("DROP TABLE IF EXISTS pipe_turn; CREATE TABLE pipe_turn (x int)")
    locking = "SELECT count(*) FROM pipe_turn WHERE x > "
    for _ in range(20):
        if quick(sidecar, locking.rstrip()):
            break
        await burst(sidecar, stack, clients, f"{locking}{next(bursts)}")
    assert quick(sidecar, locking.rstrip())
    lock = await psycopg.AsyncConnection.connect(stack.direct_url)
    try:
        await lock.execute("LOCK TABLE pipe_turn IN ACCESS EXCLUSIVE MODE")
        clients[0].send(f"{locking}{next(bursts)}")
        async with await psycopg.AsyncConnection.connect(stack.direct_url, autocommit=True) as check:
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s"
            await eventually_async(lambda: value(check, waiting, "%pipe_turn%"), 1, "the head to wait for the lock")
        clients[1].send(f"{fast}{next(bursts)}")
        got, status = await asyncio.wait_for(clients[1].answer(), WAIT)  # answered while the lock is held
        assert status == "I" and got == ["1", "SELECT 1"], got
    finally:
        await lock.close()
    assert (await asyncio.wait_for(clients[0].answer(), WAIT))[0] == ["0", "SELECT 1"]
    for client in clients:
        await client.close()
