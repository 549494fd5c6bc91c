"""Fuzzing the sidecar's codec: bad frames only ever raise ProtocolError, results never depend on how the
bytes were split, and a claimed length is never allocated.

tests/sidecar/test_protocol.py covers hand-picked garbage, random bytes (no crash) and the chunking of
well-formed streams. Here hypothesis generates *structured* streams: valid frames of every type in any
order (so out-of-order sequences such as Execute before Bind or CopyData outside COPY), then a truncated
frame or a bad header (unknown type, length below 4, lengths up to 2^32-1), cut at arbitrary points. Each
result is compared with a whole-buffer reference model written here, independently of the scanners'
incremental walk. The number of generated cases is printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from poolkit.errors import AuthenticationFailed, ProtocolError
from poolkit.sidecar.policy.auth import ScramServerExchange, UserStore
from poolkit.sidecar.wire import protocol as p
from poolkit.sidecar.wire.protocol import BackendScanner, FrontendScanner, MessageReader, StartupReader

from .report import write_summary

CASES: Counter[str] = Counter()
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FRONTEND_TYPES = b"BCDEHPSQFXdcf"
BACKEND_TYPES = b"RK23CdcGHWDIVnNAt1sTvE"  # plus Z and S, built whole below
BACKEND_HEADERS = BACKEND_TYPES + b"ZS"
LIMITS = (1024, 1 << 20, p.PG_MAX_MESSAGE_SIZE)
U32 = struct.Struct("!I")


@pytest.fixture(scope="module", autouse=True)
def report_case_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many generated cases each property ran (the issue asks for the count)."""
    yield
    total = sum(CASES.values())
    lines = [f"fuzz codec: {total} generated cases"] + [f"  {name}: {count}" for name, count in sorted(CASES.items())]
    write_summary(request, lines)


# ---------------------------------------------------------------- generators


def header(type_byte: int, length: int) -> bytes:
    return bytes([type_byte]) + U32.pack(length)


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)


def frames(types: bytes) -> st.SearchStrategy[bytes]:
    """Well-framed messages of the given types with arbitrary bodies, in any order (out of order for a peer)."""
    plain = st.builds(lambda t, body: p.message(bytes([t]), body), st.sampled_from(types), st.binary(max_size=48))
    if b"Q" in types:  # client side: also Query and Parse with SQL text, which the scanner looks into
        parse = st.builds(
            lambda name, sql: p.message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00"), TEXT, TEXT
        )
        return st.one_of(plain, TEXT.map(p.query), parse)
    # server side: ReadyForQuery (any status byte) and ParameterStatus, which the scanner looks into
    ready = st.integers(0, 255).map(p.ready_for_query)
    return st.one_of(plain, ready, st.builds(p.parameter_status, TEXT, TEXT))


def bad_tails(types: bytes, known: bytes) -> st.SearchStrategy[bytes]:
    """What ends a stream: nothing, a truncated frame, or a header no PostgreSQL peer would send."""
    unknown = st.integers(0, 255).filter(lambda t: t not in known)
    return st.one_of(
        st.just(b""),
        # A header claiming a long body (up to the largest length the 32-bit field can hold), then a little of it.
        st.builds(
            lambda t, n, body: header(t, n) + body,
            st.sampled_from(types),
            st.one_of(
                st.integers(4, 1 << 12), st.integers(1 << 20, (1 << 32) - 1), st.sampled_from([1 << 31, (1 << 31) - 1])
            ),
            st.binary(max_size=32),
        ),
        st.builds(header, st.sampled_from(types), st.integers(0, 3)),
        st.builds(
            lambda t, n, body: header(t, n) + body, unknown, st.integers(0, (1 << 32) - 1), st.binary(max_size=8)
        ),
        st.binary(min_size=1, max_size=4),  # a header cut short
    )


@st.composite
def streams(draw: st.DrawFn, types: bytes, tail_types: bytes, known: bytes) -> bytes:
    body = b"".join(draw(st.lists(frames(types), max_size=10)))
    return body + draw(bad_tails(tail_types, known))


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut into non-empty chunks at arbitrary points (a transport never delivers an empty read)."""
    if not data:
        return []
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12))
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@st.composite
def stream_and_chunks(draw: st.DrawFn, types: bytes, tail_types: bytes, known: bytes) -> tuple[bytes, list[bytes]]:
    stream = draw(streams(types, tail_types, known))
    return stream, draw(split(stream))


def offsets(chunks: list[bytes]) -> list[int]:
    return list(itertools.accumulate((len(c) for c in chunks), initial=0))[:-1]


# ---------------------------------------------------------------- reference models (whole buffer)


def expected_header_error(side: str, type_byte: int, length: int, limit: int, *, known: bool) -> str:
    if not known:
        return f"{side} sent {bytes([type_byte])!r}, which is not a PostgreSQL protocol v3 message type"
    if length > limit:
        return f"claims {length} bytes, over the limit of {limit}"
    return f"invalid length {length}"


@dataclass
class FrontendModel:
    syncs: int = 0
    unsynced: bool = False
    terminate: int = -1  # stream offset of the first Terminate header
    last_sql: str = ""
    error: str | None = None
    boundary: bool = False


def frontend_model(stream: bytes, limit: int) -> FrontendModel:
    model = FrontendModel()
    pos, n = 0, len(stream)
    while pos + 5 <= n:
        kind = p.FRONTEND_KINDS[stream[pos]]
        (length,) = U32.unpack_from(stream, pos + 1)
        if kind == p.F_INVALID or length < 4 or length > limit:
            model.error = expected_header_error("client", stream[pos], length, limit, known=kind != p.F_INVALID)
            return model
        body = stream[pos + 5 : min(pos + 1 + length, n)]
        type_byte = stream[pos : pos + 1]
        if type_byte in b"BCDE":  # Flush (H) is answered by nothing and leaves the batch state alone
            model.unsynced = True
        elif type_byte == b"S":
            model.unsynced = False
            model.syncs += 1
        elif type_byte in b"QF":
            model.syncs += 1
        elif type_byte == b"X" and model.terminate < 0:
            model.terminate = pos
        if type_byte == b"P":
            model.unsynced = True
            name_end = body.find(b"\x00")
            model.last_sql = "" if name_end < 0 else sql_text(body[name_end + 1 :])
        elif type_byte == b"Q":
            model.last_sql = sql_text(body)
        pos += 1 + length
    model.boundary = pos == n
    return model


def sql_text(body: bytes) -> str:
    return body.split(b"\x00", 1)[0][:8192].decode("utf-8", "replace")


@dataclass
class BackendModel:
    ready: int = 0
    status: int = p.IDLE
    errors: int = 0
    parameters: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    boundary: bool = False


def backend_model(stream: bytes, limit: int) -> BackendModel:
    model = BackendModel()
    pos, n = 0, len(stream)
    while pos + 5 <= n:
        kind = p.BACKEND_KINDS[stream[pos]]
        (length,) = U32.unpack_from(stream, pos + 1)
        if kind == p.B_INVALID or length < 4 or length > limit:
            model.error = expected_header_error("server", stream[pos], length, limit, known=kind != p.B_INVALID)
            return model
        end = pos + 1 + length
        if kind == p.B_ERROR:
            model.errors += 1
        elif kind in (p.B_READY, p.B_PARAMETER):
            if kind == p.B_READY and length != 5:
                model.error = f"ReadyForQuery of length {length}"
                return model
            if length > p.MAX_INSPECTED_SIZE:
                model.error = f"claims {length} bytes, over the limit of {p.MAX_INSPECTED_SIZE}"
                return model
            if end > n:
                return model  # buffered until it is whole: not a boundary, nothing reported yet
            if kind == p.B_READY:
                model.status = stream[pos + 5]
                model.ready += 1
            else:
                name, value = ([*stream[pos + 5 : end].split(b"\x00", 2), b"", b""])[:2]
                model.parameters.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
        pos = end
    model.boundary = pos == n
    return model


def message_model(stream: bytes, limit: int) -> tuple[list[tuple[bytes, bytes]], bytes, str | None]:
    out: list[tuple[bytes, bytes]] = []
    pos, n = 0, len(stream)
    while n - pos >= 5:
        (length,) = U32.unpack_from(stream, pos + 1)
        if length < 4 or length > limit:
            return out, b"", expected_header_error("client", stream[pos], length, limit, known=True)
        end = pos + 1 + length
        if end > n:
            break
        out.append((stream[pos : pos + 1], stream[pos + 5 : end]))
        pos = end
    return out, stream[pos:], None


def startup_model(stream: bytes) -> tuple[list[p.StartupPacket], str | None]:
    packets: list[p.StartupPacket] = []
    pos, n = 0, len(stream)
    while n - pos >= 4:
        (length,) = U32.unpack_from(stream, pos)
        if length < 8 or length > p.MAX_STARTUP_SIZE:
            return packets, f"invalid startup packet length {length}"
        if n - pos < length:
            break
        try:
            packets.append(p.parse_startup_packet(stream[pos : pos + length]))
        except ProtocolError as exc:
            return packets, str(exc)
        pos += length
    return packets, None


# ---------------------------------------------------------------- frontend scanner


@FUZZ
@given(case=stream_and_chunks(FRONTEND_TYPES, FRONTEND_TYPES, FRONTEND_TYPES), limit=st.sampled_from(LIMITS))
@example(case=(header(ord("Q"), (1 << 32) - 1), [header(ord("Q"), (1 << 32) - 1)]), limit=p.PG_MAX_MESSAGE_SIZE)
@example(case=(p.terminate() + b"\x00", [p.terminate()[:3], p.terminate()[3:] + b"\x00"]), limit=1024)
# Two Terminates in one read: the first one counts (the bytes before it are all that may reach the server).
@example(case=(p.query("select 1") + p.terminate() * 2, [p.query("select 1") + p.terminate() * 2]), limit=1024)
def test_frontend_scanner_matches_the_model_whatever_the_split(case: tuple[bytes, list[bytes]], limit: int) -> None:
    CASES["frontend scanner"] += 1
    stream, chunks = case
    model = frontend_model(stream, limit)
    scanner = FrontendScanner(limit)
    syncs, error, first_terminate = 0, None, None
    for start, chunk in zip(offsets(chunks), chunks, strict=True):
        try:
            syncs += scanner.feed(chunk)
        except ProtocolError as exc:
            error = str(exc)
            break
        if first_terminate is None and scanner.terminate_at != -1:
            first_terminate = (start, len(chunk), scanner.terminate_at)
    if model.error is not None:
        assert error is not None and model.error in error
        assert syncs <= model.syncs
        return
    assert error is None
    assert syncs == model.syncs
    assert scanner.unsynced == model.unsynced
    assert scanner.at_boundary == model.boundary
    if model.terminate < 0:
        assert first_terminate is None
    else:
        # Reported in the read that completes the Terminate header: its offset there, or -2 if it began earlier.
        assert first_terminate is not None
        start, size, at = first_terminate
        assert start < model.terminate + 5 <= start + size
        assert at == (model.terminate - start if model.terminate >= start else -2)
    if len(chunks) == 1:
        assert scanner.last_sql() == model.last_sql


# ---------------------------------------------------------------- backend scanner


@FUZZ
@given(case=stream_and_chunks(BACKEND_TYPES, BACKEND_HEADERS, BACKEND_HEADERS), limit=st.sampled_from(LIMITS))
@example(case=(header(ord("S"), (1 << 20) + 1), [header(ord("S"), (1 << 20) + 1)]), limit=p.PG_MAX_MESSAGE_SIZE)
@example(case=(header(ord("Z"), 1 << 31), [header(ord("Z"), 1 << 31)]), limit=p.PG_MAX_MESSAGE_SIZE)
def test_backend_scanner_matches_the_model_whatever_the_split(case: tuple[bytes, list[bytes]], limit: int) -> None:
    CASES["backend scanner"] += 1
    stream, chunks = case
    model = backend_model(stream, limit)
    scanner = BackendScanner(limit)
    ready, error, parameters = 0, None, []
    for chunk in chunks:
        try:
            ready += scanner.feed(chunk)
        except ProtocolError as exc:
            error = str(exc)
            break
        parameters.extend(scanner.parameters or [])
        scanner.parameters = None
    if model.error is not None:
        assert error is not None and model.error in error
        assert ready <= model.ready
        return
    assert error is None
    assert (ready, scanner.status, scanner.errors) == (model.ready, model.status, model.errors)
    assert parameters == model.parameters
    assert scanner.at_boundary == model.boundary


# ---------------------------------------------------------------- whole-message readers


@FUZZ
@given(
    case=stream_and_chunks(FRONTEND_TYPES + b"p", FRONTEND_TYPES + b"p", FRONTEND_TYPES + b"p"),
    limit=st.sampled_from((64, 1024, 1 << 20)),
)
def test_message_reader_matches_the_model_whatever_the_split(case: tuple[bytes, list[bytes]], limit: int) -> None:
    CASES["message reader"] += 1
    stream, chunks = case
    expected, rest, expected_error = message_model(stream, limit)
    reader = MessageReader(max_message_size=limit)
    got: list[tuple[bytes, bytes]] = []
    error = None
    for chunk in chunks:
        try:
            got.extend(reader.feed(chunk))
        except ProtocolError as exc:
            error = str(exc)
            break
    if expected_error is not None:
        assert error is not None and expected_error in error
        assert got == expected[: len(got)]
        return
    assert error is None
    assert got == expected
    assert reader.take_rest() == rest


def startup_packets() -> st.SearchStrategy[bytes]:
    """Pre-login packets: valid ones, and garbage that is framed, mis-framed or mis-laid-out."""
    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
    return st.one_of(
        st.dictionaries(text, text, max_size=4).map(p.startup_message),
        st.just(p.ssl_request()),
        st.just(U32.pack(8) + U32.pack(p.GSSENC_REQUEST_CODE)),
        st.builds(p.cancel_request, st.integers(-(1 << 31), (1 << 31) - 1), st.integers(-(1 << 31), (1 << 31) - 1)),
        # A length word and a code or version, then any bytes: the length may disagree with what follows.
        st.builds(
            lambda n, code, rest: U32.pack(n) + U32.pack(code) + rest,
            st.one_of(st.integers(0, 64), st.integers(p.MAX_STARTUP_SIZE - 2, (1 << 32) - 1)),
            st.one_of(
                st.sampled_from([p.PROTOCOL_V3, p.PROTOCOL_V3 + 7, 2 << 16, p.CANCEL_REQUEST_CODE]),
                st.integers(0, (1 << 32) - 1),
            ),
            st.binary(max_size=40),
        ),
        # A framed packet whose body is garbage (bad layout, bad UTF-8, odd parameter count).
        st.binary(max_size=40).map(lambda body: U32.pack(len(body) + 8) + U32.pack(p.PROTOCOL_V3) + body),
    )


@FUZZ
@given(data=st.data())
def test_startup_reader_matches_the_model_whatever_the_split(data: st.DataObject) -> None:
    CASES["startup reader"] += 1
    stream = b"".join(data.draw(st.lists(startup_packets(), min_size=1, max_size=4)))
    chunks = data.draw(split(stream))
    expected, expected_error = startup_model(stream)
    reader = StartupReader()
    got: list[p.StartupPacket] = []
    error = None
    try:
        for chunk in chunks:
            packet = reader.feed(chunk)
            if packet is not None:
                got.append(packet)
        while (packet := reader.feed(b"")) is not None:  # the reader hands out one packet per read
            got.append(packet)
    except ProtocolError as exc:
        error = str(exc)
    if error is not None and "received data after" in error:
        # A negotiation request with more bytes in the same read: refused (the client must wait for the answer).
        # Whether the next bytes shared its read depends on the split, so only check that it was such a request.
        assert got == expected[: len(got)]
        refused = expected[len(got)] if len(got) < len(expected) else None
        assert isinstance(refused, p.SSLRequest | p.GSSENCRequest), (refused, error)
        return
    assert got == expected
    if expected_error is None:
        assert error is None
    else:
        assert error is not None and expected_error in error


@pytest.mark.parametrize("request_packet", [p.ssl_request(), U32.pack(8) + U32.pack(p.GSSENC_REQUEST_CODE)])
def test_bytes_after_a_negotiation_request_in_the_same_read_are_refused(request_packet: bytes) -> None:
    # Fuzzing found a client could pipeline GSSENC requests: one was answered per read, the rest stayed
    # buffered, and the buffer grew with everything sent before login (see test_fuzz_live for the memory).
    assert StartupReader().feed(request_packet) is not None
    with pytest.raises(ProtocolError, match=r"received data after (SSLRequest|GSSENCRequest) before its answer"):
        StartupReader().feed(request_packet * 2)


@FUZZ
@given(packet=st.one_of(st.binary(max_size=64), startup_packets()))
@example(packet=b"")
@example(packet=b"\x00\x00\x00\x08")
@example(packet=U32.pack(16) + U32.pack(p.CANCEL_REQUEST_CODE))
def test_parse_startup_packet_only_raises_protocol_error(packet: bytes) -> None:
    CASES["parse_startup_packet"] += 1
    try:
        result = p.parse_startup_packet(packet)
    except ProtocolError:
        return
    assert isinstance(result, (p.StartupMessage, p.SSLRequest, p.GSSENCRequest, p.CancelRequest))


@FUZZ
@given(
    params=st.dictionaries(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12),
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
        max_size=5,
    )
)
def test_startup_message_round_trips(params: dict[str, str]) -> None:
    CASES["startup round trip"] += 1
    assert p.parse_startup_packet(p.startup_message(params)) == p.StartupMessage(3, 0, params)


# ---------------------------------------------------------------- client input during SCRAM authentication


@pytest.fixture(scope="module")
def users() -> UserStore:
    return UserStore({"alice": "wonderland"})


@FUZZ
@given(body=st.binary(max_size=80), first=st.binary(max_size=80), final=st.binary(max_size=120))
@example(
    body=p.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")[5:], first=b"n,,n=,r=abc", final=b"c=biws,r=x,p=!!"
)
def test_sasl_messages_only_raise_protocol_or_auth_errors(
    users: UserStore, body: bytes, first: bytes, final: bytes
) -> None:
    CASES["SASL messages"] += 1
    with contextlib.suppress(ProtocolError):
        p.parse_sasl_initial_response(body)
    exchange = ScramServerExchange(users, "alice")
    try:
        exchange.first(first)
        exchange.final(final)
    except AuthenticationFailed:
        pass


# ---------------------------------------------------------------- a claimed length is never allocated


@st.composite
def greedy_streams(draw: st.DrawFn, types: bytes) -> list[bytes]:
    """Frames whose headers claim up to PostgreSQL's 1 GiB limit while only a few bytes follow."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        claimed = draw(st.one_of(st.integers(1 << 16, p.PG_MAX_MESSAGE_SIZE), st.just(p.PG_MAX_MESSAGE_SIZE)))
        parts.append(header(draw(st.sampled_from(types)), claimed) + draw(st.binary(max_size=64)))
    return draw(split(b"".join(parts)))


def allocated_while(fn: Callable[[bytes], object], *chunks: bytes) -> int:
    """Peak bytes allocated (beyond what was live before) while feeding ``chunks`` to ``fn``."""
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    for chunk in chunks:
        try:
            fn(chunk)
        except ProtocolError:
            break
    _, peak = tracemalloc.get_traced_memory()
    return peak - before


@settings(FUZZ, max_examples=150)
@given(client=greedy_streams(FRONTEND_TYPES), server=greedy_streams(BACKEND_TYPES))
def test_no_reader_allocates_a_claimed_length(client: list[bytes], server: list[bytes]) -> None:
    CASES["allocation bound"] += 1
    tracemalloc.start()
    try:
        for chunks in (client, server):
            # Generous: a few copies of what was received plus fixed overhead, against claims of up to 1 GiB.
            bound = 4 * sum(map(len, chunks)) + 32 * 1024
            assert allocated_while(FrontendScanner().feed, *chunks) <= bound
            assert allocated_while(BackendScanner().feed, *chunks) <= bound
            assert allocated_while(MessageReader(max_message_size=p.PG_MAX_MESSAGE_SIZE).feed, *chunks) <= bound
            assert allocated_while(StartupReader().feed, *chunks) <= bound
    finally:
        tracemalloc.stop()


def test_the_allocation_bound_catches_a_reader_that_trusts_the_length() -> None:
    """The measurement above is meaningful: a reader that reserves the claimed length blows the bound."""

    def naive(chunk: bytes) -> object:
        return bytearray(U32.unpack_from(chunk, 1)[0])  # what a buffer-the-whole-message reader does first

    claimed = 16 << 20  # small enough to allocate here; the fuzzed claims go up to 1 GiB
    chunk = header(ord("D"), claimed) + b"x" * 16
    tracemalloc.start()
    try:
        assert allocated_while(naive, chunk) > claimed
        assert allocated_while(FrontendScanner().feed, chunk) <= 4 * len(chunk) + 32 * 1024
    finally:
        tracemalloc.stop()
