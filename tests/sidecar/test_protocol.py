"""The sans-IO codec, from bytes only: header walking across any chunking, limits, startup packets."""

from __future__ import annotations

import contextlib
import itertools
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolkit.errors import ProtocolError
from poolkit.sidecar.wire import protocol as p
from poolkit.sidecar.wire.protocol import (
    FAILED_TRANSACTION,
    IDLE,
    IN_TRANSACTION,
    BackendScanner,
    FrontendScanner,
    MessageReader,
    StartupReader,
)


def row(*values: str) -> bytes:
    return p.data_row(list(values))


def server_reply(status: int = IDLE, rows: int = 2) -> bytes:
    return (
        p.row_description(["x"])
        + b"".join(row(str(i)) for i in range(rows))
        + p.command_complete(f"SELECT {rows}")
        + p.ready_for_query(status)
    )


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ---------------------------------------------------------------- backend scanner


def test_backend_scanner_counts_ready_for_query_and_keeps_last_status() -> None:
    scanner = BackendScanner()
    data = server_reply(IN_TRANSACTION) + server_reply(FAILED_TRANSACTION) + server_reply(IDLE)
    assert scanner.feed(data) == 3
    assert scanner.status == IDLE
    assert scanner.at_boundary


@given(
    statuses=st.lists(st.sampled_from([IDLE, IN_TRANSACTION, FAILED_TRANSACTION]), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_backend_scanner_is_independent_of_chunking(statuses: list[int], cuts: list[int]) -> None:
    stream = b"".join(server_reply(s, rows=3) + p.parameter_status("TimeZone", f"tz{s}") for s in statuses)
    scanner = BackendScanner()
    ready = 0
    params: list[tuple[str, str]] = []
    for chunk in chunks(stream, cuts):
        ready += scanner.feed(chunk)
        params.extend(scanner.parameters or [])
        scanner.parameters = None
    assert ready == len(statuses)
    assert scanner.status == statuses[-1]
    assert params == [("TimeZone", f"tz{s}") for s in statuses]
    assert scanner.at_boundary


def test_backend_scanner_skips_a_large_body_without_buffering_it() -> None:
    big = b"D" + struct.pack("!I", 4 + 10_000_000)
    scanner = BackendScanner()
    assert scanner.feed(big + b"x" * 1000) == 0
    assert not scanner.at_boundary
    # The rest of the body arrives; only a counter moved, nothing was kept.
    remaining = 10_000_000 - 1000
    assert scanner.feed(b"y" * remaining + p.ready_for_query(IN_TRANSACTION)) == 1
    assert scanner.status == IN_TRANSACTION
    assert scanner._partial == b""


def test_backend_scanner_counts_errors() -> None:
    scanner = BackendScanner()
    scanner.feed(p.error_response("42P01", "no such table") + p.ready_for_query())
    assert scanner.errors == 1


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00\x00\x00\x08", "not a PostgreSQL protocol v3 message type"),
        (b"D\x00\x00\x00\x02", "invalid length 2"),
        (b"D\x7f\xff\xff\xff", "over the limit"),
        (b"Z\x00\x00\x00\x09IIIII", "always 5"),
    ],
)
def test_backend_scanner_rejects_garbage(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        BackendScanner().feed(data)


# ---------------------------------------------------------------- frontend scanner


def parse(sql: str, name: str = "") -> bytes:
    return p.message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00" + b"\x00\x00")


def bind() -> bytes:
    return p.message(b"B", b"\x00\x00" + b"\x00\x00" * 3)


def execute() -> bytes:
    return p.message(b"E", b"\x00" + b"\x00\x00\x00\x00")


SYNC = p.message(b"S")
FLUSH = p.message(b"H")


def test_frontend_scanner_counts_queries_and_syncs() -> None:
    scanner = FrontendScanner()
    assert scanner.feed(p.query("select 1")) == 1
    assert not scanner.unsynced
    assert scanner.feed(parse("select $1") + bind() + execute()) == 0
    assert scanner.unsynced  # a batch without Sync keeps the server
    assert scanner.feed(SYNC) == 1
    assert not scanner.unsynced
    assert scanner.feed(parse("select 2") + bind() + execute() + SYNC + p.query("select 3") + FLUSH) == 2
    # Flush is answered by nothing: after the last Sync (psycopg ends a pipeline with Sync + Flush) it
    # must not keep the server from going back to the pool.
    assert not scanner.unsynced


def test_frontend_scanner_remembers_the_last_sql_without_copying() -> None:
    scanner = FrontendScanner()
    scanner.feed(p.query("select 'a'"))
    assert scanner.last_sql() == "select 'a'"
    scanner.feed(parse("select $1::int", name="s1") + bind() + execute() + SYNC)
    assert scanner.last_sql() == "select $1::int"


@given(cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=20))
def test_frontend_scanner_is_independent_of_chunking(cuts: list[int]) -> None:
    stream = p.query("begin") + parse("insert into t values ($1)") + bind() + execute() + SYNC + p.query("commit")
    scanner = FrontendScanner()
    total = sum(scanner.feed(chunk) for chunk in chunks(stream, cuts))
    assert total == 3
    assert scanner.at_boundary
    assert not scanner.unsynced


def test_frontend_scanner_finds_terminate() -> None:
    scanner = FrontendScanner()
    data = p.query("select 1") + p.terminate()
    scanner.feed(data)
    assert scanner.terminate_at == len(p.query("select 1"))


def test_frontend_scanner_rejects_an_oversized_message_before_reading_it() -> None:
    scanner = FrontendScanner(max_message_size=1 << 20)
    header = b"Q" + struct.pack("!I", 1 << 30)
    began = time.perf_counter()
    with pytest.raises(ProtocolError, match=r"claims 1073741824 bytes.*max_message_size"):
        scanner.feed(header)
    assert time.perf_counter() - began < 1.0  # generous: it must not wait for or allocate the body


def test_frontend_scanner_rejects_server_only_and_auth_messages() -> None:
    with pytest.raises(ProtocolError, match="not a PostgreSQL protocol v3 message type"):
        FrontendScanner().feed(p.ready_for_query())
    with pytest.raises(ProtocolError):
        FrontendScanner().feed(p.password_message(b"secret\x00"))  # 'p' only during authentication


@settings(max_examples=300)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    for scanner in (FrontendScanner(max_message_size=1 << 16), BackendScanner(max_message_size=1 << 16)):
        with contextlib.suppress(ProtocolError):
            scanner.feed(data)
    with contextlib.suppress(ProtocolError):
        StartupReader().feed(data)
    with contextlib.suppress(ProtocolError):
        MessageReader().feed(data)


# ---------------------------------------------------------------- whole-message readers


def test_startup_reader_parses_startup_message_across_chunks() -> None:
    packet = p.startup_message({"user": "app", "database": "db", "application_name": "psql"})
    reader = StartupReader()
    assert reader.feed(packet[:3]) is None
    assert reader.feed(packet[3:10]) is None
    message = reader.feed(packet[10:])
    assert message == p.StartupMessage(3, 0, {"user": "app", "database": "db", "application_name": "psql"})


def test_startup_reader_recognises_ssl_gss_and_cancel() -> None:
    assert isinstance(StartupReader().feed(p.ssl_request()), p.SSLRequest)
    assert isinstance(StartupReader().feed(struct.pack("!II", 8, p.GSSENC_REQUEST_CODE)), p.GSSENCRequest)
    assert StartupReader().feed(p.cancel_request(1234, -5)) == p.CancelRequest(1234, -5)


@pytest.mark.parametrize(
    ("packet", "match"),
    [
        (struct.pack("!I", 4), "invalid startup packet length"),
        (struct.pack("!I", 1_000_000), "invalid startup packet length"),
        (struct.pack("!II", 8, 2 << 16), "unsupported frontend protocol 2.0"),
        (struct.pack("!II", 12, p.PROTOCOL_V3) + b"user", "layout"),
        (struct.pack("!II", 14, p.PROTOCOL_V3) + b"user\x00\x00", "layout"),
    ],
)
def test_startup_reader_rejects_bad_packets(packet: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        StartupReader().feed(packet)


def test_message_reader_yields_whole_messages_and_limits_size() -> None:
    reader = MessageReader(max_message_size=100)
    data = p.query("select 1") + p.message(b"S")
    assert reader.feed(data[:4]) == []
    assert reader.feed(data[4:]) == [(b"Q", b"select 1\x00"), (b"S", b"")]
    with pytest.raises(ProtocolError, match="over the limit of 100"):
        reader.feed(b"Q" + struct.pack("!I", 1000))


def test_error_response_round_trip() -> None:
    data = p.error_response("57014", "pool exhausted", detail="d", hint="h", severity="FATAL")
    reader = MessageReader()
    [(kind, body)] = reader.feed(data)
    assert kind == b"E"
    fields = p.parse_error_fields(body)
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "57014", "M": "pool exhausted", "D": "d", "H": "h"}


def test_sasl_initial_response_round_trip() -> None:
    [(kind, body)] = MessageReader().feed(p.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert kind == b"p"
    assert p.parse_sasl_initial_response(body) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
