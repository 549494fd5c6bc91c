"""Named prepared statements through the sidecar in transaction mode (prepared.py), and through PgBouncer 1.18.

The sans-IO core is tested from bytes against a reference model of a PostgreSQL session; the real
drivers (asyncpg's statement cache, psycopg's prepare_threshold, pgbench -M prepared) run against the
stack's PostgreSQL through a sidecar with 3 upstream connections, and the same workloads through the
stack's PgBouncer 1.18 (transaction mode, pool of 3) fail with the prepared-statement errors the
sidecar removes.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import struct
import time
from typing import TYPE_CHECKING

import asyncpg
import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import generators, waiting

from poolkit.dev.devstack import DevStack, find_pg_binary
from poolkit.errors import ConfigError
from poolkit.sidecar.policy.prepared import EVENTS, AnswerHead, ClientStatements, ServerStatements
from poolkit.sidecar.wire import protocol as p

from .conftest import run, upstream_settings
from .test_ops import admin

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import SidecarThread

    Factory = Callable[..., SidecarThread]

# ---------------------------------------------------------------- the sans-IO core against a model session

_U32 = struct.Struct("!I")


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + _U32.pack(len(body) + 4) + body


def parse(name: str, query: str) -> bytes:
    return msg(b"P", name.encode() + b"\0" + query.encode() + b"\0" + b"\0\0")


def bind(statement: str, portal: str = "") -> bytes:
    return msg(b"B", portal.encode() + b"\0" + statement.encode() + b"\0" + b"\0\0" + b"\0\0" + b"\0\0")


def describe(kind: str, name: str) -> bytes:
    return msg(b"D", kind.encode() + name.encode() + b"\0")


def close(kind: str, name: str) -> bytes:
    return msg(b"C", kind.encode() + name.encode() + b"\0")


def execute(portal: str = "") -> bytes:
    return msg(b"E", portal.encode() + b"\0" + b"\0\0\0\0")


SYNC = msg(b"S")
FLUSH = msg(b"H")


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


class ModelSession:
    """A reference model of one PostgreSQL session's answers to the messages prepared statements touch.

    Statements (named and unnamed) and portals as PostgreSQL keeps them; an error skips every message
    up to Sync. Answers carry the statement's query text (RowDescription, DataRow), so a test sees
    *which* statement ran. Queries starting with FAIL fail to parse; with ERR, fail to execute.
    """

    def __init__(self) -> None:
        self.reader = p.MessageReader(side="client")
        self.statements: dict[bytes, bytes] = {}
        self.portals: dict[bytes, bytes] = {}
        self.skipping = False

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for kind, body in self.reader.feed(data):
            if kind == b"S":
                self.skipping = False
                out += p.ready_for_query()
            elif self.skipping or kind == b"H":
                continue
            elif kind == b"Q":
                sql = body.rstrip(b"\0")
                if sql == b"DISCARD ALL":
                    self.statements.clear()
                    self.portals.clear()
                out += p.command_complete(sql.decode()) + p.ready_for_query()
            else:
                out += self._extended(kind, body)
        return bytes(out)

    def _fail(self, code: str, text: str) -> bytes:
        self.skipping = True
        return p.error_response(code, text)

    def _extended(self, kind: bytes, body: bytes) -> bytes:  # noqa: PLR0911 - a model server: each extended-protocol message's answer and its errors, in PostgreSQL's order, side by side
        if kind == b"P":
            name, rest = body.split(b"\0", 1)
            sql = rest.split(b"\0", 1)[0]
            if name and name in self.statements:
                return self._fail("42P05", f'prepared statement "{name.decode()}" already exists')
            if sql.startswith(b"FAIL"):
                return self._fail("42601", f"syntax error in {sql.decode()}")
            self.statements[name] = sql
            return b"1\0\0\0\4"
        if kind == b"B":
            portal, statement, _ = body.split(b"\0", 2)
            if statement not in self.statements:
                return self._fail("26000", f'prepared statement "{statement.decode()}" does not exist')
            self.portals[portal] = self.statements[statement]
            return b"2\0\0\0\4"
        if kind == b"D":
            name = body[1:-1]
            found = (self.statements if body[:1] == b"S" else self.portals).get(name)
            if found is None:
                return self._fail("26000", f"{body[:1].decode()} {name.decode()!r} does not exist")
            head = msg(b"t", b"\0\0") if body[:1] == b"S" else b""
            return head + p.row_description([found.decode()])
        if kind == b"E":
            sql = self.portals.get(body.split(b"\0", 1)[0])
            if sql is None:
                return self._fail("34000", "portal does not exist")
            if sql.startswith(b"ERR"):
                return self._fail("22012", f"division by zero in {sql.decode()}")
            return p.data_row([sql.decode()]) + p.command_complete("SELECT 1")
        if kind == b"C":
            (self.statements if body[:1] == b"S" else self.portals).pop(body[1:-1], None)
            return b"3\0\0\0\4"
        raise AssertionError(kind)


class Link:
    """One model server connection behind a BackendScanner and ServerStatements, as server.py wires them."""

    def __init__(self, limit: int, stats: dict[str, int]) -> None:
        self.session = ModelSession()
        self.scanner = p.BackendScanner()
        self.statements = ServerStatements(self.scanner, limit, stats)
        self.owed = b""  # answers the model sent that the sidecar has not read yet


class Client:
    """One client as client.py relays it: FrontendScanner, ClientStatements, pending ReadyForQuery."""

    def __init__(self, turns: list[list[tuple[bytes, int]]]) -> None:
        self.turns = list(turns)  # per server assignment: segments, each sent once the one before is answered
        self.scanner = p.FrontendScanner()
        self.statements = ClientStatements()
        self.pending = 0
        self.received = bytearray()


def relay(clients: list[Client], links: list[Link], rng: random.Random) -> None:
    """Run every client's turns through the links like the sidecar: any chunking, any interleaving."""
    waiting = [c for c in clients if c.turns]
    while waiting:
        client = rng.choice(waiting)
        link = rng.choice(links)
        for number, (segment, answered) in enumerate(client.turns.pop(0)):
            cuts = sorted(rng.sample(range(1, len(segment)), min(len(segment) - 1, rng.randint(0, 4))))
            pieces = [segment[a:b] for a, b in itertools.pairwise([0, *cuts, len(segment)])]
            if number == 0:
                # The first pieces arrive before the pool hands out a server (client.py queues them).
                queued = pieces[: rng.randint(1, len(pieces))]
                pieces = pieces[len(queued) :]
                flagged = False
                for piece in queued:
                    client.pending += client.scanner.feed(piece)
                    if client.scanner.named_at >= 0:
                        client.scanner.named_at = -1
                        flagged = True
                sent = b"".join(queued)
                if flagged:
                    sent = _rewrite(client, link, sent, (link.scanner.ready_total, 0))
                _to_server(link, sent)
            _exchange(client, link, pieces, answered, rng)
        # Released at ReadyForQuery with nothing owed: the next client finds nothing of this one's.
        assert not link.owed and not link.statements.queue and not link.statements.active
        assert client.scanner.at_boundary and not client.statements.engaged
        waiting = [c for c in clients if c.turns]


def _exchange(client: Client, link: Link, pieces: list[bytes], answered: int, rng: random.Random) -> None:
    while pieces or client.pending > 0 or len(client.received) < answered:
        if pieces and (not link.owed or rng.random() < 0.5):
            piece = pieces.pop(0)
            syncs = client.scanner.feed(piece)
            if client.scanner.named_at >= 0:
                # As client.py's _send_rewritten: the position is the server's ReadyForQuery seen + owed.
                head, out, answers, error = client.statements.forward(
                    piece, link.statements, client.scanner, link.scanner.ready_total + client.pending
                )
                assert error is None
                client.pending += syncs
                client.received += answers
                _to_server(link, head + out)
            else:
                client.pending += syncs
                _to_server(link, piece)
        else:
            assert link.owed, "the client waits for an answer the server will never send"
            take = rng.randint(1, len(link.owed))
            chunk, link.owed = link.owed[:take], link.owed[take:]
            ready = link.scanner.feed(chunk)
            if link.scanner.discarded:
                link.scanner.discarded = False
                link.statements.discard_all()
                client.statements.clear()
            if link.statements.active:
                chunk = link.statements.responses(chunk)
            client.received += chunk
            client.pending -= ready


def _rewrite(client: Client, link: Link, data: bytes, start: tuple[int, int] | None) -> bytes:
    out, answers = client.statements.rewrite_chunk(data, link.statements, start, client.scanner)
    client.received += answers
    return out


def _to_server(link: Link, data: bytes) -> None:
    link.owed += link.session.feed(data)


NAMES = ["a", "b", "c"]
QUERIES = ["SELECT 1", "SELECT 2", "SELECT 3", "FAIL 4", "ERR 5"]


def random_batches(rng: random.Random, turns: int) -> list[list[bytes]]:
    """Turns of batches (each ending with Sync or a Query) as drivers send them: prepare, bind/describe/
    execute, close, pipelines, failures, DISCARD ALL."""
    script = []
    for _ in range(turns):
        turn: list[bytes] = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.08:
                turn.append(query(rng.choice(["SELECT 9", "DISCARD ALL"])))
                continue
            batch: list[bytes] = []
            for _ in range(rng.randint(1, 4)):
                name = rng.choice(NAMES)
                action = rng.random()
                if action < 0.3:
                    batch.append(parse(name, rng.choice(QUERIES)))
                    if rng.random() < 0.5:
                        batch += [describe("S", name), FLUSH]
                elif action < 0.75:
                    batch += [bind(name), describe("P", ""), execute()]
                elif action < 0.85:
                    batch += [parse("", rng.choice(QUERIES)), bind(""), execute()]
                elif action < 0.95:
                    batch.append(close("S", name))
                else:
                    batch.append(describe("S", name))
            if rng.random() < 0.15:
                # Ending with Flush (as asyncpg's prepare does), the client waits for the answers, then syncs.
                turn += [b"".join([*batch, FLUSH]), SYNC]
            else:
                turn.append(b"".join([*batch, SYNC]))
        script.append(turn)
    return script


def segments(script: list[list[bytes]]) -> tuple[list[list[tuple[bytes, int]]], bytes]:
    """Cut each turn after every batch that fails, runs DISCARD ALL or ends with Flush; return those turns
    (segments, each with how much a client has received once it is answered) and what a session of its
    own answers.

    What a client pipelines behind such a batch is rewritten before its outcome is known (a statement
    whose Parse failed, or that DISCARD ALL dropped, is still renamed: its error names the server-side
    statement, or a Bind the server has prepared for another client runs). So, like drivers, the relay
    sends what follows those batches once they are answered.
    """
    session = ModelSession()
    answered = bytearray()
    turns = []
    for turn in script:
        cut: list[tuple[bytes, int]] = [(b"", 0)]
        for batch in turn:
            answer = session.feed(batch)
            answered += answer
            cut[-1] = (cut[-1][0] + batch, len(answered))
            kinds = [kind for kind, _ in p.MessageReader(side="server").feed(answer)]
            if b"E" in kinds or batch.startswith(query("DISCARD ALL")) or batch.endswith(FLUSH):
                cut.append((b"", 0))
        turns.append([c for c in cut if c[0]])
    return turns, bytes(answered)


@pytest.mark.parametrize("limit", [1, 2, 200])
def test_rewritten_sessions_answer_like_sessions_of_their_own(limit: int) -> None:
    # Differential: 4 clients on 2 shared model servers, any chunking and interleaving, must each get
    # byte for byte what a session of its own answers.
    for seed in range(150):
        rng = random.Random(seed)
        stats = dict.fromkeys(EVENTS, 0)
        links = [Link(limit, stats) for _ in range(2)]
        plans = [segments(random_batches(rng, rng.randint(2, 6))) for _ in range(4)]
        clients = [Client(turns) for turns, _ in plans]
        relay(clients, links, rng)
        for client, (_, expected) in zip(clients, plans, strict=True):
            assert bytes(client.received) == expected, f"seed {seed}"
        for link in links:
            # Evicted statements were closed on the server: it holds no more than the cache says.
            named = {k for k in link.session.statements if k}
            assert len(named) <= len(link.statements) + len(link.statements.orphans), f"seed {seed}"
            assert len(link.statements) <= limit


def test_scanner_flags_only_chunks_that_name_a_statement() -> None:
    # What pgbench -M extended, psycopg and asyncpg without a statement cache send: relayed untouched.
    unnamed = parse("", "SELECT 1") + bind("") + describe("P", "") + execute() + SYNC + query("SELECT 1")
    scanner = p.FrontendScanner()
    assert scanner.feed(unnamed) == 2
    assert scanner.named_at == -1 and scanner.batch == 0
    for message in (parse("s", "SELECT 1"), bind("s"), describe("S", "s"), close("S", "s")):
        scanner = p.FrontendScanner()
        scanner.feed(unnamed + parse("", "SELECT 2") + message + SYNC)
        at = len(unnamed) + len(parse("", "SELECT 2"))
        assert (scanner.named_at, scanner.named_syncs, scanner.named_batch) == (at, 2, 1)
        # Split anywhere inside it (the name not there yet, or not even the header), the read holding its
        # start is flagged all the same: the rewriter must see that message from its first byte.
        for cut in range(1, len(message)):
            scanner = p.FrontendScanner()
            scanner.feed(unnamed + message[:cut])
            assert scanner.named_at == len(unnamed), cut
    scanner = p.FrontendScanner()
    scanner.feed(describe("P", "portal") + close("P", "portal") + bind("", portal="portal"))
    assert scanner.named_at == -1


def _prepared(transaction: bool) -> tuple[ClientStatements, ServerStatements, ModelSession]:
    """A client that prepared "s" (SELECT 1) on a server (behind a transaction pooler or not), answered."""
    scanner = p.BackendScanner()
    server = ServerStatements(scanner, 10, dict.fromkeys(EVENTS, 0), transaction=transaction)
    client = ClientStatements()
    session = ModelSession()
    out, answers = client.rewrite(parse("s", "SELECT 1") + SYNC, server, (0, 0))
    assert answers == b""
    answer = session.feed(out)
    scanner.feed(answer)
    assert server.responses(answer) == b"1\x00\x00\x00\x04" + p.ready_for_query()
    assert not server.active
    return client, server, session


def _scanned(data: bytes) -> p.FrontendScanner:
    scanner = p.FrontendScanner()
    scanner.feed(data)
    return scanner


def test_a_request_first_in_its_batch_is_prepared_again_behind_a_transaction_pooler() -> None:
    request = bind("s") + describe("P", "") + execute() + SYNC
    client, server, _ = _prepared(transaction=True)
    binds = client.reprepared_binds(request, server, _scanned(request), owed=0, head_owed=False)
    assert binds is not None and [b[0].key for b in binds] == [b"SELECT 1\x00\x00\x00"]
    # Not while anything of the client's is owed, nor behind other messages, nor on a session of its own.
    assert client.reprepared_binds(request, server, _scanned(request), owed=1, head_owed=False) is None
    assert client.reprepared_binds(request, server, _scanned(request), owed=0, head_owed=True) is None
    behind = query("SELECT 9") + request
    assert client.reprepared_binds(behind, server, _scanned(behind), owed=0, head_owed=False) is None
    plain_client, plain_server, plain_session = _prepared(transaction=False)
    assert plain_client.reprepared_binds(request, plain_server, _scanned(request), owed=0, head_owed=False) is None

    # Prepared again as the unnamed statement on whichever backend it lands: a fresh session runs it, and
    # the head of the answer the sidecar added is checked and removed (AnswerHead). The client gets what a
    # session of its own answers.
    own = ModelSession().feed(parse("s", "SELECT 1") + request)[len(b"1\x00\x00\x00\x04") :]
    out = client.reprepare(request, server, binds, server.scanner.ready_total)
    assert AnswerHead(binds[0][0]).feed(ModelSession().feed(out)) == own

    # On a server that has the statement, the same request is only renamed.
    plain_binds = plain_client.bound(request)
    assert plain_binds is not None
    renamed = plain_client.rename(request, plain_server, plain_binds, plain_server.scanner.ready_total)
    assert len(renamed) == len(request) - len("s") + len(plain_server.cache[plain_binds[0][0].key])
    assert plain_session.feed(renamed) == own


def test_a_chunk_is_rewritten_from_where_its_first_named_message_starts() -> None:
    before = parse("", "SELECT 2") + bind("") + execute() + SYNC
    named = parse("s", "SELECT 1") + SYNC
    statements = ClientStatements()
    server = ServerStatements(p.BackendScanner(), 10, dict.fromkeys(EVENTS, 0))
    scanner = _scanned(before + named)
    head, out, answers, error = statements.forward(before + named, server, scanner, 5)
    assert (head, answers, error) == (before, b"", None)
    # The rest is positioned after the one Sync before it (5 + 1), first in its batch.
    assert (
        out
        == ClientStatements().rewrite(
            named, ServerStatements(p.BackendScanner(), 10, dict.fromkeys(EVENTS, 0)), (6, 0)
        )[0]
    )
    # (the Close of its server name the sidecar sends first, then the Parse)
    assert sorted((entry.z, entry.t) for entry in server.queue) == [(6, 0), (6, 1)]
    assert scanner.named_at == -1
    # A message split across chunks: the next chunk continues it (and is flagged, from its first byte).
    cut = parse("s2", "SELECT 3")[:7]
    scanner = _scanned(cut)
    assert statements.forward(cut, server, scanner, 0) == (b"", b"", b"", None)
    assert statements.engaged and scanner.named_at == 0
    rest = parse("s2", "SELECT 3")[7:] + SYNC
    scanner.feed(rest)
    head, out, answers, error = statements.forward(rest, server, scanner, 0)
    assert (head, error) == (b"", None) and b"SELECT 3" in out
    assert not statements.engaged and scanner.named_at == -1
    # Bytes no client sends stop the rewriting; what came before them still goes (a Sync there commits).
    bad = msg(b"P", b"s3")  # no terminator for its name
    scanner = _scanned(before + bad)
    head, out, _, error = statements.forward(before + bad, server, scanner, 0)
    assert head == before and out == b"" and error is not None


def test_max_prepared_statements_must_not_be_negative(stack: DevStack) -> None:
    with pytest.raises(ConfigError, match=r"max_prepared_statements.*0 or more"):
        upstream_settings(stack, max_prepared_statements=-1)


# ---------------------------------------------------------------- drivers: 50 clients on 3 connections, and PgBouncer

CLIENTS = 50
ASYNCPG_STATEMENTS = [
    ("SELECT $1::int + 1", lambda i: i + 1),
    ("SELECT $1::int * 2", lambda i: i * 2),
    ("SELECT $1::int - 3", lambda i: i - 3),
]


async def _asyncpg_workload(url: str, rounds: int) -> list[BaseException]:
    """50 asyncpg connections, default statement cache, each running every statement ``rounds`` times."""
    errors: list[BaseException] = []

    async def client(n: int) -> None:
        conn = await asyncpg.connect(url)
        try:
            # executemany pipelines Bind/Execute of one named statement over many reads before its Sync.
            try:
                await conn.executemany("SELECT $1::int", [(i,) for i in range(100)])
            except asyncpg.PostgresError as exc:
                errors.append(exc)
            for r in range(rounds):
                for sql, expect in ASYNCPG_STATEMENTS:
                    value = n * 100 + r
                    try:
                        got = await conn.fetchval(sql, value)
                    except asyncpg.PostgresError as exc:
                        errors.append(exc)
                        continue
                    if got != expect(value):
                        errors.append(AssertionError(f"wrong result {got} for {sql} with {value}"))
        finally:
            await conn.close()

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return errors


async def test_asyncpg_default_statement_cache(sidecar_factory: Factory, stack: DevStack) -> None:
    sidecar = sidecar_factory(max_size=3)
    assert await _asyncpg_workload(sidecar.url(), rounds=4) == []
    assert sidecar.call(lambda app: len(app.pool.servers)) <= 3

    # The same through PgBouncer 1.18 (transaction mode, 3 server connections): statements vanish.
    errors = await _asyncpg_workload(stack.url(via="pgbouncer", sslmode="disable"), rounds=4)
    assert errors
    assert any(
        re.search(r'prepared statement "__asyncpg_stmt_\w+__" (does not exist|already exists)', str(e)) for e in errors
    ), [str(e) for e in errors[:3]]


async def _psycopg_workload(url: str, rounds: int, *, prepare: bool | None = None) -> list[BaseException]:
    """50 psycopg connections (default prepare_threshold=5, or prepare=True on every execute)."""
    errors: list[BaseException] = []

    async def client(n: int) -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            for r in range(rounds):
                for sql, expect in PSYCOPG_STATEMENTS:
                    value = n * 100 + r
                    try:
                        cur = await conn.execute(sql, (value,), prepare=prepare)
                        row = await cur.fetchone()
                    except psycopg.Error as exc:
                        errors.append(exc)
                        continue
                    if row is None or row[0] != expect(value):
                        # Through PgBouncer a client can even bind another client's statement of the same name.
                        errors.append(AssertionError(f"wrong result {row} for {sql} with {value}"))

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return errors


PSYCOPG_STATEMENTS = [
    ("SELECT %s::int + 1", lambda i: i + 1),
    ("SELECT %s::int * 2", lambda i: i * 2),
]
PSYCOPG_ERROR = re.compile(r'prepared statement "_pg3_\d+" (does not exist|already exists)')


@pytest.mark.parametrize("prepare", [None, True], ids=["prepare_threshold", "prepare_true"])
async def test_psycopg_prepared_statements(sidecar_factory: Factory, stack: DevStack, prepare: bool | None) -> None:
    sidecar = sidecar_factory(max_size=3)
    # 8 rounds: past psycopg's default prepare_threshold (5), so every statement gets prepared.
    assert await _psycopg_workload(sidecar.url(), rounds=8, prepare=prepare) == []
    stats = sidecar.call(lambda app: dict(app.pool.stats.prepared_statements))
    assert stats["miss"] >= 2 and stats["hit"] > stats["miss"]

    errors = await _psycopg_workload(stack.url(via="pgbouncer", sslmode="disable"), rounds=8, prepare=prepare)
    assert any(PSYCOPG_ERROR.search(str(e)) for e in errors), [str(e) for e in errors[:3]]


def test_pgbench_prepared(sidecar_factory: Factory, stack: DevStack, pgbench_tables: None) -> None:
    sidecar = sidecar_factory(max_size=3)
    pgbench = str(find_pg_binary("pgbench"))
    # -S: pgbench prepares with a blocking PQprepare, which stalls its whole thread until a server
    # connection frees up; in TPC-B's open transactions that never happens with 50 clients on 3
    # connections, through any transaction pooler (PgBouncer 1.21+ included).
    argv = [pgbench, "-n", "-S", "-M", "prepared", "-c", str(CLIENTS), "-j", "2", "-t", "40"]
    done = run([*argv, sidecar.url()])
    assert done.returncode == 0, done.stderr
    assert f"number of transactions actually processed: {CLIENTS * 40}/{CLIENTS * 40}" in done.stdout
    assert "number of failed transactions: 0" in done.stdout

    assert "error" not in done.stderr

    # Through PgBouncer 1.18 every client prepares P_0 on whichever of the 3 server sessions it gets:
    # all but (at most) 3 of the 50 find it there already; a client whose Bind lands on a session
    # without it is aborted ("does not exist") when it comes first there.
    failed = run([*argv, stack.url(via="pgbouncer", sslmode="disable")])
    assert failed.stderr.count('ERROR:  prepared statement "P_0" already exists') >= CLIENTS - 3


# ---------------------------------------------------------------- statement lifecycles on shared server sessions


class Session:
    """A client speaking the extended protocol through libpq (psycopg's PGconn): prepare, run, describe, close.

    Each call is sent, then waited for the way psycopg waits (libpq's blocking calls may hold the GIL,
    and the sidecar under test runs in a thread of this process).
    """

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.pgconn = self.conn.pgconn

    def _result(self) -> psycopg.pq.abc.PGresult:
        results = waiting.wait(generators.execute(self.pgconn), self.pgconn.socket)
        return results[-1]

    def prepare(self, name: str, sql: str) -> str | None:
        """None when it worked, else PostgreSQL's message."""
        self.pgconn.send_prepare(name.encode(), sql.encode())
        return _error(self._result())

    def run(self, name: str, *params: str) -> str:
        """The first value of the first row, or ``error: <message>``."""
        self.pgconn.send_query_prepared(name.encode(), [v.encode() for v in params] or None)
        result = self._result()
        error = _error(result)
        if error is not None:
            return f"error: {error}"
        value = result.get_value(0, 0)
        return value.decode() if value is not None else "NULL"

    def describe(self, name: str) -> int | str:
        """The statement's parameter count, or PostgreSQL's message."""
        self.pgconn.send_describe_prepared(name.encode())
        result = self._result()
        return _error(result) or result.nparams

    def close(self, name: str) -> str | None:
        self.pgconn.send_close_prepared(name.encode())
        return _error(self._result())

    def query(self, sql: str) -> list[tuple[object, ...]]:
        cursor = self.conn.execute(sql, prepare=False)
        return cursor.fetchall() if cursor.description else []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _error(result: psycopg.pq.abc.PGresult) -> str | None:
    if result.status in (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK):
        return None
    return (result.error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode()


def metric_samples(url: str, name: str) -> dict[str, float]:
    """{event: value} of one sidecar counter, scraped over HTTP."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels["event"]] = sample.value
    return out


def test_hits_and_misses_of_a_known_sequence_are_counted(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=1)  # one server session: every client shares it
    with Session(sidecar.url()) as a, Session(sidecar.url()) as b:
        assert a.prepare("s1", "SELECT 1 + $1::int") is None  # miss: sent to the server
        assert [a.run("s1", str(i)) for i in range(3)] == ["1", "2", "3"]  # 3 Binds: hits
        assert b.prepare("t1", "SELECT 1 + $1::int") is None  # a Parse is always sent: a miss
        assert [b.run("t1", "9"), b.run("t1", "10")] == ["10", "11"]  # hits
        assert b.describe("t1") == 1  # Describe: a hit
        # One statement on the server for both clients' names.
        assert a.query("SELECT count(*) FROM pg_prepared_statements") == [(1,)]
    counted = metric_samples(sidecar.metrics_url, "poolkit_sidecar_prepared_statements_total")
    assert counted == {"hit": 6.0, "miss": 2.0, "eviction": 0.0}


def test_eviction_keeps_results_correct_and_the_server_cache_bounded(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=1, max_prepared_statements=2)
    with Session(sidecar.url()) as client:
        for i in range(5):
            assert client.prepare(f"s{i}", f"SELECT {i} * $1::int") is None
        for _ in range(3):
            assert [client.run(f"s{i}", "10") for i in range(5)] == [str(i * 10) for i in range(5)]
        # What the server session really holds: never more than max_prepared_statements.
        assert client.query("SELECT count(*) FROM pg_prepared_statements") == [(2,)]
        # The admin console agrees: the client has 5 names, its server 2 statements.
        console = sidecar.url(database="poolkit")
        assert [row["prepared_statements"] for row in admin(console, "SHOW CLIENTS")] == ["5"]
        assert [row["prepared_statements"] for row in admin(console, "SHOW SERVERS")] == ["2"]
    counted = metric_samples(sidecar.metrics_url, "poolkit_sidecar_prepared_statements_total")
    # 5 Parses and 15 Binds: with room for 2, every Bind finds its statement evicted (round robin).
    assert counted == {"miss": 20.0, "eviction": 18.0, "hit": 0.0}


def test_close_then_parse_again_gets_the_new_statement(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=1)
    with Session(sidecar.url()) as client:
        assert client.prepare("s", "SELECT 'old'") is None
        assert client.run("s") == "old"
        assert client.close("s") is None
        assert client.run("s") == 'error: prepared statement "s" does not exist'
        assert client.prepare("s", "SELECT 'new'") is None
        assert client.run("s") == "new"


def test_same_name_different_sql_in_two_clients(sidecar_factory: Factory, stack: DevStack) -> None:
    sidecar = sidecar_factory(max_size=1)
    with Session(sidecar.url()) as a, Session(sidecar.url()) as b:
        assert a.prepare("s", "SELECT 'a'") is None
        assert b.prepare("s", "SELECT 'b'") is None
        assert [(a.run("s"), b.run("s")) for _ in range(5)] == [("a", "b")] * 5

    # Without it (max_prepared_statements=0), and in PgBouncer 1.18 with one server session: the
    # second Parse collides, and b runs a's statement.
    plain = sidecar_factory(max_size=1, max_prepared_statements=0)
    bouncer = stack.start_pgbouncer(client_tls=False, pool_size=1)
    try:
        for url in (plain.url(), bouncer.url()):
            with Session(url) as a, Session(url) as b:
                assert a.prepare("s", "SELECT 'a'") is None
                assert b.prepare("s", "SELECT 'b'") == 'prepared statement "s" already exists'
                assert b.run("s") == "a"
    finally:
        bouncer.stop()


def replace_server(sidecar: SidecarThread, stack: DevStack) -> None:
    """Terminate the sidecar's only server session and wait until the sidecar has let it go."""
    [pid] = sidecar.call(lambda app: [s.backend_pid for s in app.pool.servers])
    with psycopg.connect(stack.superuser_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    deadline = time.monotonic() + 10
    while sidecar.call(lambda app: [s.backend_pid for s in app.pool.servers]) == [pid]:
        assert time.monotonic() < deadline, "the sidecar did not notice the terminated backend"
        time.sleep(0.02)


def test_statements_survive_their_server_connection(sidecar_factory: Factory, stack: DevStack) -> None:
    sidecar = sidecar_factory(max_size=1)
    with Session(sidecar.url()) as client:
        assert client.prepare("s", "SELECT 41 + $1::int") is None
        assert client.run("s", "1") == "42"
        pids = sidecar.call(lambda app: [s.backend_pid for s in app.pool.servers])
        replace_server(sidecar, stack)
        # A new server session: the statement is prepared there before the Bind, unseen by the client.
        assert client.run("s", "2") == "43"
        assert sidecar.call(lambda app: [s.backend_pid for s in app.pool.servers]) != pids


def test_errors_are_postgresqls(sidecar_factory: Factory, stack: DevStack) -> None:
    sidecar = sidecar_factory(max_size=1)
    with Session(sidecar.url()) as client, psycopg.connect(stack.direct_url, autocommit=True) as direct:
        assert client.prepare("bad", "SELEC 1") == 'syntax error at or near "SELEC"'
        assert client.run("bad") == 'error: prepared statement "bad" does not exist'
        assert client.prepare("s", "SELECT 1") is None
        assert client.prepare("s", "SELECT 2") == 'prepared statement "s" already exists'
        assert client.run("s") == "1"
        # Prepared again on a new server session after its table went away: the client gets
        # PostgreSQL's own error for its statement, as it would from its own session.
        direct.execute("CREATE TABLE prep_gone (x int)")
        direct.execute("INSERT INTO prep_gone VALUES (7)")
        assert client.prepare("g", "SELECT x FROM prep_gone") is None
        assert client.run("g") == "7"
        direct.execute("DROP TABLE prep_gone")
        replace_server(sidecar, stack)
        assert client.run("g") == 'error: relation "prep_gone" does not exist'
        assert client.run("s") == "1"  # the session is fine
        # DEALLOCATE ALL (or DISCARD ALL) drops the client's statements as PostgreSQL would.
        client.query("DEALLOCATE ALL")
        assert client.run("s") == 'error: prepared statement "s" does not exist'
        assert client.prepare("s", "SELECT 3") is None
        assert client.run("s") == "3"


def _pipelines(conn: psycopg.Connection[tuple[object, ...]], tag: int) -> list[object]:
    """psycopg pipelines of prepared statements, one failing half-way: what each step returned."""
    seen: list[object] = []
    with conn.pipeline():
        cursors = [conn.execute("SELECT %s::int * 3 + %s", [i, tag], prepare=True) for i in range(20)]
    seen += [c.fetchone() for c in cursors]
    try:
        with conn.pipeline():
            conn.execute("SELECT %s::int * 3 + %s", [100, tag], prepare=True)
            conn.execute("SELECT 1 / (%s::int - %s)", [tag, tag], prepare=True)
            conn.execute("SELECT %s::int * 5", [7], prepare=True)
    except psycopg.Error as exc:
        seen.append(type(exc).__name__)
    with conn.pipeline():
        cursors = [conn.execute("SELECT %s::int * 5", [i], prepare=True) for i in range(5)]
    seen += [c.fetchone() for c in cursors]
    return seen


def test_psycopg_pipelines_match_a_session_of_their_own(sidecar_factory: Factory, stack: DevStack) -> None:
    with psycopg.connect(stack.direct_url, autocommit=True) as direct:
        expected = [_pipelines(direct, tag) for tag in (1, 2)]
    sidecar = sidecar_factory(max_size=1)
    with psycopg.connect(sidecar.url(), autocommit=True) as a, psycopg.connect(sidecar.url(), autocommit=True) as b:
        # Two clients, one server session: same statement names (_pg3_0, ...), different statements.
        assert [_pipelines(a, 1), _pipelines(b, 2)] == expected
        assert [_pipelines(a, 1), _pipelines(b, 2)] == expected  # now every statement is prepared
    assert expected[0][20] == "DivisionByZero"
