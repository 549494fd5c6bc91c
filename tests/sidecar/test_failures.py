"""Failure handling: dead clients, dead backends, bad bytes, an exhausted pool, an unreachable upstream."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncpg
import httpx
import psycopg
import pytest
from psycopg.pq import TransactionStatus

from poolkit.dev.devstack import DevStack
from poolkit.sidecar.wire import protocol as p

if TYPE_CHECKING:
    from .conftest import SidecarThread

Factory = Callable[..., "SidecarThread"]


class RawClient:
    """A bare protocol-3 client on a socket, for sending bytes no driver would send."""

    def __init__(self, port: int, *, user: str = "app", database: str = "app") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(p.startup_message({"user": user, "database": database}))
        self.reader = p.MessageReader(side="server", max_message_size=1 << 24)
        self.until(b"Z")

    def until(self, kind: bytes) -> list[tuple[bytes, bytes]]:
        got: list[tuple[bytes, bytes]] = []
        while not got or got[-1][0] != kind:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed; got {[k for k, _ in got]}")
            got.extend(self.reader.feed(data))
        return got

    def error_then_eof(self) -> dict[str, str]:
        """Read to EOF; return the fields of the ErrorResponse received."""
        messages: list[tuple[bytes, bytes]] = []
        while data := self.sock.recv(65536):
            messages.extend(self.reader.feed(data))
        errors = [p.parse_error_fields(body) for kind, body in messages if kind == b"E"]
        assert errors, f"no ErrorResponse before EOF: {messages}"
        return errors[-1]


def count_rows(stack: DevStack, table: str) -> int:
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def setup_table(stack: DevStack, table: str) -> None:
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (x int)")


# ---------------------------------------------------------------- a client dies mid-transaction


async def _die_in_transaction(url: str) -> int:
    conn = await asyncpg.connect(url, statement_cache_size=0)
    await conn.execute("SET myapp.tenant = 'leak'")  # a session SET outside any transaction
    await conn.execute("BEGIN")
    await conn.execute("SET LOCAL statement_timeout = '1234s'")
    await conn.execute("INSERT INTO killed_tx VALUES (1)")
    pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
    conn.terminate()  # the socket just closes: no ROLLBACK, no Terminate message
    return pid


def _next_client_view(url: str) -> tuple[int, str, str, TransactionStatus]:
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        row = conn.execute(
            "SELECT pg_backend_pid(), coalesce(current_setting('myapp.tenant', true), ''), "
            "current_setting('statement_timeout')"
        ).fetchone()
        assert row is not None
        return int(row[0]), row[1], row[2], conn.info.transaction_status


async def test_client_killed_mid_transaction_leaves_nothing_behind(sidecar_factory: Factory, stack: DevStack) -> None:
    setup_table(stack, "killed_tx")
    sidecar = sidecar_factory(max_size=1)  # one server: the next client surely gets the same backend
    pid = await _die_in_transaction(sidecar.url())
    await _wait_idle(sidecar)
    backend, tenant, timeout, status = _next_client_view(sidecar.url())
    assert backend == pid  # the warm connection was kept, not thrown away...
    assert status == TransactionStatus.IDLE  # ...but it is not inside the dead client's transaction
    assert count_rows(stack, "killed_tx") == 0  # which was rolled back, not committed
    assert timeout != "1234s"
    assert tenant == ""  # and the dead client's session SET was reset (server_reset_query)


async def test_without_the_reset_query_a_pinned_server_is_closed(sidecar_factory: Factory, stack: DevStack) -> None:
    setup_table(stack, "killed_tx")
    sidecar = sidecar_factory(max_size=1, server_reset_query="")
    pid = await _die_in_transaction(sidecar.url())
    await _wait_idle(sidecar)
    backend, tenant, _, status = _next_client_view(sidecar.url())
    # The session SET pinned the dead client (session.py); with nothing to reset that session, its
    # server connection is closed rather than handed on (test_isolation.py shows the leak without it).
    assert backend != pid
    assert status == TransactionStatus.IDLE
    assert count_rows(stack, "killed_tx") == 0
    assert tenant == ""


async def _wait_idle(sidecar: SidecarThread) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sidecar.call(lambda app: app.pool.server_counts()["active"]) == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the dead client's server connection was never cleaned up")


def test_client_killed_mid_query_gets_its_server_closed(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=1)
    raw = RawClient(sidecar.port)
    raw.sock.sendall(p.query("SELECT pg_sleep(30)"))
    deadline = time.monotonic() + 10
    while sidecar.call(lambda app: app.pool.server_counts()["active"]) == 0:  # the query reached a server
        assert time.monotonic() < deadline, "the query never reached a server"
        time.sleep(0.02)
    raw.sock.close()
    # The query was still running: the server's state is unknown, so it is closed, and the pool
    # opens a fresh one for the next client at once.
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.transaction_status == TransactionStatus.IDLE


# ---------------------------------------------------------------- the upstream backend dies


def test_terminated_backend_fails_only_its_client_and_the_pool_recovers(
    sidecar: SidecarThread, stack: DevStack
) -> None:
    with (
        psycopg.connect(sidecar.url(), prepare_threshold=None) as victim,
        psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as bystander,
    ):
        row = victim.execute("SELECT pg_backend_pid()").fetchone()  # opens a transaction
        assert row is not None
        with psycopg.connect(stack.superuser_url, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", [row[0]]).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError, match="terminating connection due to administrator command"):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 2").fetchone() == (2,)
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as again:
        assert again.execute("SELECT 3").fetchone() == (3,)
    metrics = httpx.get(sidecar.metrics_url).text
    assert 'poolkit_sidecar_upstream_errors_total{kind="terminated",pool="app"} 1.0' in metrics


# ---------------------------------------------------------------- bad bytes


def test_garbage_from_one_client_drops_only_that_client(sidecar: SidecarThread) -> None:
    with psycopg.connect(sidecar.url(), prepare_threshold=None) as other:
        other.execute("SELECT 1")  # in a transaction, holding a server
        raw = RawClient(sidecar.port)
        raw.sock.sendall(b"\x00garbage that is no protocol message")
        fields = raw.error_then_eof()
        assert fields["C"] == "08P01"
        assert "not a PostgreSQL protocol v3 message type" in fields["M"]
        assert other.execute("SELECT 2").fetchone() == (2,)
        other.commit()


def test_oversized_message_is_refused_without_reading_it(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_message_size=1 << 20)
    raw = RawClient(sidecar.port)
    # Claims 1 GiB; only the 5-byte header is ever sent.
    raw.sock.sendall(b"Q" + struct.pack("!I", 1 << 30))
    fields = raw.error_then_eof()
    assert fields["S"] == "FATAL"
    assert "claims 1073741824 bytes" in fields["M"]
    assert "max_message_size" in fields["M"]
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_garbage_startup_packet_is_refused(sidecar: SidecarThread) -> None:
    sock = socket.create_connection(("127.0.0.1", sidecar.port), timeout=10)
    sock.sendall(struct.pack("!I", 99_999_999) + b"junk")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    [(kind, body)] = p.MessageReader().feed(data)
    assert kind == b"E"
    assert "invalid startup packet length" in p.parse_error_fields(body)["M"]


# ---------------------------------------------------------------- timeouts


def test_query_wait_timeout_names_pool_size_and_wait(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=1, query_wait_timeout=0.5)
    with (
        psycopg.connect(sidecar.url(), prepare_threshold=None) as holder,
        psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as waiter,
    ):
        holder.execute("SELECT 1")  # BEGIN ... holds the only server
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            waiter.execute("SELECT 2")
        message = str(info.value)
        assert 'pool "app" is exhausted' in message
        assert "all 1 server connections" in message
        assert "query_wait_timeout" in message
        assert info.value.diag.message_hint and "max_size" in info.value.diag.message_hint
        holder.commit()
        # The waiting client's session survived the error and works once the server is free.
        assert waiter.execute("SELECT 3").fetchone() == (3,)
    metrics = httpx.get(sidecar.metrics_url).text
    assert 'poolkit_sidecar_query_wait_timeouts_total{pool="app"} 1.0' in metrics


def test_idle_in_transaction_timeout_frees_the_server(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=1, idle_transaction_timeout=1.0)
    with psycopg.connect(sidecar.url(), prepare_threshold=None) as idler:
        idler.execute("SELECT 1")
        time.sleep(2.5)
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout, match="idle_transaction_timeout"):
            idler.execute("SELECT 2")
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_unreachable_upstream_gives_a_clear_error(sidecar_factory: Factory, stack: DevStack) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    url = stack.url(via="direct").replace(f":{stack.pg_port}/", f":{dead_port}/")
    sidecar = sidecar_factory(direct_url=url, connect_timeout=2.0)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar.url(), prepare_threshold=None)
    message = str(info.value)
    assert "cannot reach its upstream" in message
    assert f"127.0.0.1:{dead_port}" in message
    assert stack.app_password not in message
    ready = httpx.get(f"http://127.0.0.1:{sidecar.http_port}/readyz")
    assert ready.status_code == 503
    assert "upstream unreachable" in ready.text


def test_many_clients_die_while_waiting(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=1)
    with psycopg.connect(sidecar.url(), prepare_threshold=None) as holder:
        holder.execute("SELECT 1")
        raws = [RawClient(sidecar.port) for _ in range(20)]
        for raw in raws:
            raw.sock.sendall(p.query("SELECT 1"))
        time.sleep(0.2)
        assert sidecar.call(lambda app: len(app.pool.waiters)) == 20
        for raw in raws:
            raw.sock.close()
        deadline = time.monotonic() + 10
        while sidecar.call(lambda app: len(app.pool.waiters)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sidecar.call(lambda app: len(app.pool.waiters)) == 0
        holder.commit()
    done = threading.Event()

    def check() -> None:
        with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        done.set()

    check()
    assert done.is_set()
