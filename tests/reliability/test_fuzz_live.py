"""Fuzzing a live sidecar over raw sockets while well-behaved clients keep working.

The sidecar runs as a child process (its memory is read from /proc) in front of the session stack's
PostgreSQL. Hypothesis generates connections that send garbage startup packets, bad headers after login
(unknown types, lengths below 4 or up to 2^32-1), out-of-order but well-framed extended-protocol messages,
truncated messages, and garbage on the admin console. Meanwhile asyncpg and psycopg clients run queries
and transactions in a loop. For every case: the sidecar answers the offending connection with an
ErrorResponse (SQLSTATE and text checked) and closes it, or serves it, or waits for the rest of a
truncated message; it never crashes, its memory does not jump, and the steady clients see no error.
tests/sidecar/test_failures.py covers one hand-written example of each; here they are generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from poolkit.dev.devstack import DevStack
from poolkit.errors import ProtocolError
from poolkit.sidecar.wire import protocol as p
from poolkit.sidecar.wire.protocol import FrontendScanner, MessageReader, StartupReader

from .child_sidecar import ChildSidecar
from .report import write_summary

LOGIN_TIMEOUT = 2.0
QUIET = 0.25  # how long a connection that should be waiting for more bytes must stay silent and open
U32 = struct.Struct("!I")
OUTCOMES: Counter[str] = Counter()
MEMORY: dict[str, int] = {}

# Types sent with random bodies after login. Not Query or FunctionCall: random SQL or a random function
# OID could do real work on the shared database; their framing is fuzzed through the bad headers below.
LOGIN_TYPES = b"BCDEHPSdcf"
FRONTEND_TYPES = b"BCDEHPSQFXdcf"
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
PROBE = p.query("SELECT 41 + 1")
PG_LARGE_LIMIT = 256 << 20  # below PostgreSQL's own limit for Query/Parse/Bind/CopyData (1 GiB - 2)


# ---------------------------------------------------------------- the sidecar and its well-behaved clients


@dataclass
class Steady:
    """Well-behaved clients querying through the sidecar in a loop (their own thread and event loop)."""

    url: str
    ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Steady:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="steady-clients", daemon=True)
        self._thread.start()
        return self

    async def _main(self) -> None:
        tasks = [self._asyncpg(i) for i in range(3)] + [self._psycopg(i) for i in range(2)]
        await asyncio.gather(*tasks)

    async def _asyncpg(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                conn = await asyncpg.connect(self.url, statement_cache_size=0)
            except Exception as exc:
                self.failed(f"asyncpg-{n} connect", exc)
                continue
            try:
                while not self._stop.is_set():
                    i += 1
                    assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
                    async with conn.transaction():
                        await conn.execute("INSERT INTO fuzz_steady (client, v) VALUES ($1, $2)", f"asyncpg-{n}", i)
                        assert await conn.fetchval("SELECT count(*) FROM fuzz_steady WHERE v = $1", i) >= 1
                    self.ops["asyncpg"] += 1
                    await asyncio.sleep(0.01)
            except Exception as exc:
                self.failed(f"asyncpg-{n}", exc)  # then reconnect, so one failure is not counted a thousand times
            finally:
                await conn.close(timeout=5)

    async def _psycopg(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, prepare_threshold=None)
            except Exception as exc:
                self.failed(f"psycopg-{n} connect", exc)
                continue
            try:
                while not self._stop.is_set():
                    i += 1
                    async with conn.transaction():
                        await conn.execute("INSERT INTO fuzz_steady (client, v) VALUES (%s, %s)", (f"psycopg-{n}", i))
                        cur = await conn.execute("SELECT %s::int * 2", (i,))
                        assert await cur.fetchone() == (i * 2,)
                    self.ops["psycopg"] += 1
                    await asyncio.sleep(0.01)
            except Exception as exc:
                self.failed(f"psycopg-{n}", exc)
            finally:
                await conn.close()

    def failed(self, who: str, exc: BaseException) -> None:
        self.errors.append(f"{who} at {time.strftime('%H:%M:%S')}: {exc!r}")
        time.sleep(0.2)  # (blocks this thread's loop briefly: a failing client must not spin)

    def check(self, at_least: int = 1) -> None:
        assert self.errors == [], self.errors[:5]
        assert self.ops["asyncpg"] >= at_least and self.ops["psycopg"] >= at_least, self.ops

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def child(stack: DevStack) -> Iterator[ChildSidecar]:
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS fuzz_steady; CREATE TABLE fuzz_steady (client text, v int)")
    sidecar = ChildSidecar(stack, client_login_timeout=LOGIN_TIMEOUT, max_size=3)
    yield sidecar
    sidecar.stop()


@pytest.fixture(scope="module")
def steady(child: ChildSidecar, request: pytest.FixtureRequest) -> Iterator[Steady]:
    clients = Steady(child.url()).start()
    deadline = time.monotonic() + 30
    while (clients.ops["asyncpg"] < 3 or clients.ops["psycopg"] < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield clients
    clients.stop()
    clients.check()
    output = child.output()
    # An exception escaping a protocol callback would show up as a traceback from the event loop.
    assert "Traceback" not in output and "Fatal error" not in output, output[-3000:]
    lines = [f"fuzz live: {sum(OUTCOMES.values())} connections; outcomes {dict(sorted(OUTCOMES.items()))}"]
    lines.append(f"fuzz live: steady clients ran {dict(clients.ops)} operations with 0 errors")
    if MEMORY:
        lines.append(f"fuzz live: sidecar memory after all cases (KiB): {MEMORY}")
    write_summary(request, lines)


# ---------------------------------------------------------------- a raw client


class Raw:
    """One socket speaking (or not) protocol 3; ``read`` parses whatever the sidecar answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = MessageReader(side="server", max_message_size=1 << 24)

    def login(self, database: str = "app") -> None:
        self.sock.sendall(p.startup_message({"user": "app", "database": database}))
        messages, eof = self.read(until=b"Z")
        assert not eof and messages[-1][0] == b"Z", messages

    def read(
        self, *, until: bytes | None = None, after: bytes | None = None, quiet: float = QUIET, limit: float = 15.0
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Messages until EOF, or until a message of type ``until`` (following the whole message ``after``,
        if given), or, without ``until``, until ``quiet`` seconds pass without a byte. Returns (messages, eof)."""
        messages: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + limit
        self.sock.settimeout(quiet if until is None else limit)
        seen_after = after is None
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                assert until is None, f"no {until!r} within {limit}s: {[k for k, _ in messages][:20]}"
                return messages, False
            except ConnectionResetError:
                return messages, True
            if not data:
                return messages, True
            for kind, body in self.reader.feed(data):
                messages.append((kind, body))
                if not seen_after and p.message(kind, body) == after:
                    seen_after = True
                elif seen_after and kind == until:
                    return messages, False
        raise AssertionError(f"the sidecar kept talking for {limit}s: {[k for k, _ in messages][:20]}")

    def read_byte(self) -> bytes:
        self.sock.settimeout(10)
        return self.sock.recv(1)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def fatal(messages: list[tuple[bytes, bytes]]) -> dict[str, str]:
    errors = [p.parse_error_fields(body) for kind, body in messages if kind == b"E"]
    assert errors, f"no ErrorResponse: {[k for k, _ in messages]}"
    assert errors[-1]["S"] == "FATAL", errors[-1]
    return errors[-1]


def predicted_client_error(payload: bytes) -> str | None:
    """The text of the ProtocolError the sidecar's scanner raises on ``payload`` (None if it raises none)."""
    try:
        FrontendScanner().feed(payload)
    except ProtocolError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- generated connections


def header(type_byte: int, length: int) -> bytes:
    return bytes([type_byte]) + U32.pack(length)


unknown_types = st.integers(0, 255).filter(lambda t: p.FRONTEND_KINDS[t] == p.F_INVALID)
bad_headers = st.one_of(
    st.builds(
        header,
        st.sampled_from(FRONTEND_TYPES),
        st.one_of(st.integers(p.PG_MAX_MESSAGE_SIZE + 1, (1 << 32) - 1), st.sampled_from([1 << 31, (1 << 32) - 1])),
    ),
    st.builds(header, unknown_types, st.integers(0, (1 << 32) - 1)),
    st.builds(header, st.sampled_from(FRONTEND_TYPES), st.integers(0, 3)),
    st.binary(max_size=16).map(lambda body: p.message(b"p", body)),  # PasswordMessage after login
)
frames = st.one_of(
    st.builds(lambda t, body: p.message(bytes([t]), body), st.sampled_from(LOGIN_TYPES), st.binary(max_size=40)),
    st.builds(lambda name, sql: p.message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00"), TEXT, TEXT),
)


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    """A header and part of its body; PostgreSQL's own limits (10,000 bytes for most types) are respected,
    so only the sidecar is being tested."""
    type_byte = draw(st.sampled_from(b"BPQd"))
    claimed = draw(st.one_of(st.integers(64, 10_000), st.integers(10_001, PG_LARGE_LIMIT)))
    return header(type_byte, claimed) + draw(st.binary(max_size=min(claimed - 5, 48)))


def startup_garbage() -> st.SearchStrategy[bytes]:
    params = st.dictionaries(
        st.sampled_from(["user", "database", "options", "application_name", "bad name", "TimeZone", "_pq_.x"]),
        TEXT,
        max_size=4,
    )
    return st.one_of(
        params.map(p.startup_message),
        st.just(p.ssl_request()),
        st.just(U32.pack(8) + U32.pack(p.GSSENC_REQUEST_CODE)),
        st.builds(p.cancel_request, st.integers(-(1 << 31), (1 << 31) - 1), st.integers(-(1 << 31), (1 << 31) - 1)),
        st.builds(
            lambda n, code, rest: U32.pack(n) + U32.pack(code) + rest,
            st.one_of(st.integers(0, 64), st.integers(p.MAX_STARTUP_SIZE - 2, (1 << 32) - 1)),
            st.one_of(st.sampled_from([p.PROTOCOL_V3, p.PROTOCOL_V3 + 1, 2 << 16]), st.integers(0, (1 << 32) - 1)),
            st.binary(max_size=24),
        ),
        st.binary(max_size=40).map(lambda body: U32.pack(len(body) + 8) + U32.pack(p.PROTOCOL_V3) + body),
        st.binary(min_size=1, max_size=40),
    )


cases = st.one_of(
    st.tuples(st.just("startup"), startup_garbage()),
    st.tuples(
        st.just("bad header"), st.builds(lambda fs, bad: b"".join(fs) + bad, st.lists(frames, max_size=3), bad_headers)
    ),
    # Ends with a clean Sync (PostgreSQL stops skipping after an error there) and a probe query.
    st.tuples(
        st.just("out of order"),
        st.lists(frames, min_size=1, max_size=6).map(lambda fs: b"".join(fs) + p.message(b"S") + PROBE),
    ),
    st.tuples(st.just("truncated"), truncated()),
    st.tuples(
        st.just("admin"),
        st.lists(st.one_of(frames, TEXT.map(p.query), bad_headers), min_size=1, max_size=3).map(
            lambda fs: b"".join(fs) + p.message(b"S")
        ),
    ),
)


def run_startup(raw: Raw, payload: bytes) -> str:
    reader = StartupReader()
    expected: str | None = None
    packet: p.StartupPacket | None = None
    try:
        packet = reader.feed(payload)
    except ProtocolError as exc:
        expected = str(exc)
    if expected is not None:
        raw.sock.sendall(payload)
        messages, eof = raw.read(limit=10)
        assert eof
        error = fatal(messages)
        assert (error["C"], error["M"]) == ("08P01", expected)
        return "refused 08P01 (startup)"
    raw.sock.sendall(payload)
    if packet is None:  # incomplete: the sidecar waits (client_login_timeout ends it)
        messages, eof = raw.read()
        assert (messages, eof) == ([], False)
        return "waiting (incomplete startup)"
    if isinstance(packet, p.SSLRequest | p.GSSENCRequest):
        assert raw.read_byte() == b"N"  # no client TLS configured, never GSSAPI
        messages, eof = raw.read()
        assert (messages, eof) == ([], False)
        return "answered N"
    if isinstance(packet, p.CancelRequest):
        messages, eof = raw.read(limit=10)
        assert (messages, eof) == ([], True)
        return "closed (cancel request)"
    messages, eof = raw.read(until=b"Z", limit=10)
    if messages and messages[-1][0] == b"Z":
        return "logged in"
    assert eof
    error = fatal(messages)
    # user missing, options, unknown database, bad setting name, or a setting PostgreSQL refused
    assert error["C"] in {"28000", "08P01", "3D000", "42704", "22023", "22P02", "42501", "0A000"}, error
    return f"refused {error['C']} (startup)"


def run_after_login(raw: Raw, kind: str, payload: bytes) -> str:
    raw.login("poolkit" if kind == "admin" else "app")
    raw.sock.sendall(payload)
    if kind == "truncated":
        messages, eof = raw.read()
        assert (messages, eof) == ([], False)  # waits for the rest, allocating nothing for it
        return "waiting (truncated message)"
    if kind == "admin":
        return admin_outcome(raw, payload)
    expected = predicted_client_error(payload)
    if expected is not None:
        messages, eof = raw.read(limit=10)
        assert eof
        error = fatal(messages)
        assert (error["C"], error["M"]) == ("08P01", expected)
        return "refused 08P01"
    messages, eof = raw.read(until=b"Z", after=p.data_row(["42"]), limit=10)
    if eof:  # a malformed body (the sidecar's prepared-statement parsing, or PostgreSQL) ended the session
        error = fatal(messages)
        return f"ended with FATAL {error['C']}"
    return "answered, session still usable"  # the probe query after the garbage got its answer


def admin_outcome(raw: Raw, payload: bytes) -> str:
    """What the admin console did with ``payload`` sent after its login, checked against :func:`admin_verdict`."""
    verdict = admin_verdict(payload)
    messages, eof = raw.read(limit=10)
    if verdict == "fatal":
        assert eof
        error = fatal(messages)
        assert error["C"] == "08P01", error
        return "refused 08P01 (admin)"
    assert not eof
    if verdict == "waiting":
        return "waiting (admin, truncated message)"
    assert messages and messages[-1][0] == b"Z", messages
    return "answered (admin)"


def admin_verdict(payload: bytes) -> str:
    """What the admin console does with ``payload``: answer it, refuse it (FATAL), or wait for more bytes."""
    reader = MessageReader(max_message_size=p.MAX_INSPECTED_SIZE)
    try:
        messages = reader.feed(payload)
    except ProtocolError:
        return "fatal"
    if any(kind not in b"QSPBDECH" for kind, _ in messages):
        return "fatal"
    return "waiting" if reader.take_rest() else "answered"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
@example(case=("bad header", header(ord("Q"), (1 << 32) - 1)))
@example(case=("bad header", header(ord("Q"), 1 << 31)))
@example(case=("truncated", header(ord("Q"), PG_LARGE_LIMIT) + b"SELECT"))
@example(case=("out of order", p.message(b"E", b"\x00\x00\x00\x00\x00") + p.message(b"S") + PROBE))
@example(case=("startup", U32.pack(8) + U32.pack(p.GSSENC_REQUEST_CODE) * 3))
def test_generated_bad_input_ends_only_the_offending_connection(
    child: ChildSidecar, steady: Steady, case: tuple[str, bytes]
) -> None:
    kind, payload = case
    raw = Raw(child.port)
    try:
        outcome = run_startup(raw, payload) if kind == "startup" else run_after_login(raw, kind, payload)
    finally:
        raw.close()
    OUTCOMES[outcome] += 1
    assert child.alive()
    assert not steady.errors, (steady.errors[:5], child.output()[-4000:])


# ---------------------------------------------------------------- targeted: slow loris, floods, memory


def test_slow_loris_logins_are_ended_by_client_login_timeout(child: ChildSidecar, steady: Steady) -> None:
    packet = p.startup_message({"user": "app", "database": "app"})
    loris = [Raw(child.port) for _ in range(20)]
    began = time.monotonic()
    for i in range(len(packet) - 1):  # one byte at a time, never the last one
        for raw in loris:
            with contextlib.suppress(OSError):
                raw.sock.sendall(packet[i : i + 1])
        if time.monotonic() - began > LOGIN_TIMEOUT + 2:
            break
        time.sleep(0.1)
    for raw in loris:
        messages, eof = raw.read(limit=10)
        assert eof
        error = fatal(messages)
        assert error["C"] == "08006"
        assert error["M"] == f"client_login_timeout ({LOGIN_TIMEOUT:g}s) expired"
        raw.close()
    OUTCOMES["slow loris ended by client_login_timeout"] += len(loris)
    steady.check()


def test_pre_login_flood_is_refused_without_buffering_it(child: ChildSidecar, steady: Steady) -> None:
    # Fuzzing found this: GSSENC requests pipelined before login were answered one per read while the rest
    # stayed buffered, so the sidecar's memory grew with whatever a client sent (61 -> 433 MB for 200 MiB).
    before = child.memory()
    flood = U32.pack(8) + U32.pack(p.GSSENC_REQUEST_CODE)
    raws = [Raw(child.port) for _ in range(4)]
    for raw in raws:
        with contextlib.suppress(OSError):  # the sidecar may close while we are still sending
            for _ in range(64):
                raw.sock.sendall(flood * 65536)  # 512 KiB per write, 32 MiB per client
    for raw in raws:
        # The sidecar refuses at the first read (08P01, checked on a small case above) and closes; unread
        # bytes make the kernel reset the connection, so the error text may not survive the flood.
        messages, eof = raw.read(limit=10)
        assert eof and [kind for kind, _ in messages] in ([], [b"E"]), messages
        raw.close()
    after = child.memory()
    assert after["VmHWM"] - before["VmHWM"] < 32 * 1024, (before, after)
    OUTCOMES["pre-login flood refused"] += len(raws)
    steady.check()


def test_a_claimed_gigabyte_is_streamed_not_allocated(child: ChildSidecar, steady: Steady, stack: DevStack) -> None:
    """A COPY row claiming 512 MiB: the sidecar forwards 32 MiB of it and its memory stays flat."""
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS fuzz_copy; CREATE TABLE fuzz_copy (t text)")
    before = child.memory()
    raw = Raw(child.port)
    raw.login()
    raw.sock.sendall(p.query("COPY fuzz_copy FROM STDIN"))
    messages, _ = raw.read(until=b"G")
    assert messages[-1][0] == b"G"  # CopyInResponse
    raw.sock.sendall(header(ord("d"), 512 << 20))
    chunk = b"x" * (1 << 20)
    for _ in range(32):
        raw.sock.sendall(chunk)
    during = child.memory()
    raw.close()
    assert during["VmHWM"] - before["VmHWM"] < 32 * 1024, (before, during)  # KiB: far below 512 MiB or even 32 MiB
    assert during["VmPeak"] - before["VmPeak"] < 256 * 1024, (before, during)
    OUTCOMES["512 MiB claim streamed"] += 1
    steady.check()


def test_memory_stayed_flat_and_metrics_still_serve(child: ChildSidecar, steady: Steady) -> None:
    """Runs after the generated cases (file order): nothing they claimed was ever allocated."""
    memory = child.memory()
    # Generous: the interpreter, uvloop, a few hundred closed connections; a claimed 2^31 would be 2 GiB.
    assert memory["VmHWM"] < 256 * 1024, memory
    metrics = httpx.get(child.metrics_url, timeout=10).text
    assert 'poolkit_sidecar_client_logins_total{pool="app",result="error"}' in metrics
    steady.check(at_least=20)
    MEMORY.update(memory)  # printed with the module's summary


def test_half_a_message_does_not_hold_a_server(stack: DevStack) -> None:
    """A logged-in client that sends part of a small message and stalls must not pin a server connection.

    Known gap (reported, not fixed here: client.py belongs to the pooling work). The sidecar hands a client
    a server as soon as any byte arrives, and no timeout covers a server held by a client that is mid-message
    in an idle session (idle_transaction_timeout only sees open transactions), so max_size such clients
    starve every other client. PgBouncer waits for a whole small packet before it assigns a server.
    """
    sidecar = ChildSidecar(stack, max_size=3, query_wait_timeout=3, idle_transaction_timeout=2)
    stallers = []
    try:
        for _ in range(3):  # max_size
            raw = Raw(sidecar.port)
            raw.login()
            raw.sock.sendall(header(ord("Q"), 100) + b"SELE")  # 9 of 101 bytes, then nothing
            stallers.append(raw)
        time.sleep(3)  # longer than idle_transaction_timeout
        with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)  # today: QueryCanceled, pool exhausted
    finally:
        for raw in stallers:
            raw.close()
        sidecar.stop()
