"""The delay relay (tests/support/netdelay): adds its delay both ways, keeps every byte in order, carries PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from support.netdelay import DelayRelay, build_netdelay

from poolkit.dev.devstack import DevStack
from poolkit.errors import DevStackError

DELAY_MS = 5.0


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on loopback (a thread per connection)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    server.close()


def round_trips(port: int, count: int) -> list[float]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(count):
            began = time.perf_counter()
            sock.sendall(b"?")
            assert sock.recv(1) == b"?"
            times.append(time.perf_counter() - began)
    return times


def test_a_round_trip_through_the_relay_takes_at_least_twice_the_delay(echo_port: int) -> None:
    with DelayRelay("127.0.0.1", echo_port, DELAY_MS) as relay:
        delayed = round_trips(relay.port, 10)
    straight = round_trips(echo_port, 10)
    # Without the relay a loopback round trip is far below the delay: the relay is what adds it.
    assert min(straight) < DELAY_MS / 1000
    assert min(delayed) >= 2 * DELAY_MS / 1000, f"fastest round trip {min(delayed) * 1000:.2f} ms"


def test_a_large_transfer_arrives_intact_and_in_order_both_ways(echo_port: int) -> None:
    payload = os.urandom(24 * 1024 * 1024)
    received = hashlib.sha256()
    count = 0
    relay = DelayRelay("127.0.0.1", echo_port, 1.0).start()
    with relay, socket.create_connection(("127.0.0.1", relay.port), timeout=60) as sock:

        def read_back() -> None:
            nonlocal count
            while count < len(payload):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return
                received.update(chunk)
                count += len(chunk)

        reader = threading.Thread(target=read_back)
        reader.start()
        for offset in range(0, len(payload), 1_000_003):  # odd-sized writes: chunk edges move around
            sock.sendall(payload[offset : offset + 1_000_003])
        sock.shutdown(socket.SHUT_WR)
        reader.join(60)
        assert sock.recv(1) == b"", "the EOF was not passed on after the data"
    assert count == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert relay.stats == {"accepted": 1, "bytes_up": len(payload), "bytes_down": len(payload)}


def test_many_connections_at_once_each_get_their_own_bytes_back(echo_port: int) -> None:
    payloads = [os.urandom(256 * 1024 + n) for n in range(30)]
    echoed: list[bytes] = [b""] * len(payloads)

    def one(index: int, port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(payloads[index])
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
            echoed[index] = b"".join(chunks)

    with DelayRelay("127.0.0.1", echo_port, 0.25) as relay:
        threads = [threading.Thread(target=one, args=(i, relay.port)) for i in range(len(payloads))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert [len(e) for e in echoed] == [len(p) for p in payloads]
    assert echoed == payloads, "bytes of one connection reached another, or arrived out of order"
    assert relay.stats["accepted"] == len(payloads)


def test_stop_ends_open_connections_and_a_dead_target_resets_clients(echo_port: int) -> None:
    relay = DelayRelay("127.0.0.1", echo_port, 1.0).start()
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
    try:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        relay.stop()
        assert relay.stats["accepted"] == 1
        assert sock.recv(1) == b"", "the relay's connections outlived it"
    finally:
        sock.close()
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = int(closed.getsockname()[1])
    closed.close()
    to_nowhere = DelayRelay("127.0.0.1", dead_port, 1.0).start()
    # The reset may already meet the client in connect() (the relay accepted, found no target and reset it).
    with (
        to_nowhere,
        pytest.raises(ConnectionResetError),
        socket.create_connection(("127.0.0.1", to_nowhere.port), timeout=30) as client,
    ):
        client.recv(1)


def test_postgresql_through_the_relay(stack: DevStack) -> None:
    assert stack.pgbouncer is not None
    with DelayRelay(stack.host, stack.pgbouncer_port, 1.0) as relay:
        url = stack.pgbouncer.url(sslmode="verify-full", sslrootcert=str(stack.ca_file)).replace(
            f":{stack.pgbouncer_port}/", f":{relay.port}/"
        )
        with psycopg.connect(url) as conn:
            began = time.perf_counter()
            assert conn.execute("SELECT 6 * 7").fetchone() == (42,)
            assert time.perf_counter() - began >= 0.002  # one query: at least one delayed round trip

        async def with_asyncpg() -> int:
            conn = await asyncpg.connect(url, statement_cache_size=0)
            try:
                return int(await conn.fetchval("SELECT sum(g) FROM generate_series(1, $1::int) g", 1000))
            finally:
                await conn.close()

        assert asyncio.run(with_asyncpg()) == 500500
    assert relay.stats["accepted"] == 2


def test_a_missing_compiler_is_named_with_its_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(DevStackError, match="apt-get install -y gcc"):
        build_netdelay(tmp_path / "cache")
    monkeypatch.delenv("CC")
    assert build_netdelay(tmp_path / "cache").parent == tmp_path / "cache"
