"""Time to cancel a streaming result, and LISTEN/NOTIFY delivery latency: direct vs PgBouncer vs the sidecar.

Usage: .venv/bin/python bench/bench_cancel.py [--rounds 7] [--rows 3000000] [--notifies 300]

Cancel: a client reads ``COPY (SELECT generate_series(1, rows)) TO STDOUT`` (many messages of a few bytes
each, the case where a relay is busiest per byte); after 1 MB it sends a cancel. Three numbers per round: how
long the cancel connection stayed open (it is closed once the cancel was passed on: the time for the cancel
to *leave*), the time from the cancel to the ``QueryCanceled`` error (the time for it to *land*), and the
bytes of result that arrived in between. Two clients: a fast one (the raw protocol, reading 1 MB at a time,
as a C client would; the relay is then the bottleneck) and psycopg (``cancel_safe()``, a Python loop per
row; the client is then the bottleneck). Targets: PostgreSQL direct (TLS), PgBouncer 1.18 in transaction
mode, the sidecar in front of PostgreSQL, and the sidecar in front of PgBouncer; the poolers reach
PostgreSQL over TLS, clients talk plain TCP to them.

Beside a COPY: ``SELECT 1`` round trips on one connection while another reads a large COPY as fast as it can
(one busy result must not hold up the other clients of a pooler).

Notify: a client LISTENs through the target; another, connected directly, sends ``NOTIFY``; the latency is
from just before the NOTIFY is sent to its arrival at the listener (PgBouncer in transaction mode cannot
deliver notifications to a client between transactions, so it is not in that table).

Medians with the range of the rounds. Machines are noisy: compare the columns of one run, never runs on
different days.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import statistics
import subprocess
import sys
import threading
import time

import benchlib
import psycopg
from psycopg import errors

from poolkit.dev.devstack import DevStack, free_port
from poolkit.sidecar.wire import protocol

sys.path.insert(0, str(benchlib.REPO / "tests"))  # the raw protocol client the tests use too
from support.wire import open_raw, raw_login

_CANCEL_AFTER = 1 << 20
# ReadyForQuery(I), the end of a simple query's answer: in a COPY of numbers no CopyData can hold these bytes.
_READY = b"Z\x00\x00\x00\x05I"


def start_sidecar(
    upstream_url: str, port: int, http_port: int, *, pooled: bool, direct_url: str
) -> subprocess.Popen[str]:
    """``python -m poolkit.sidecar`` (uvloop, as deployed) with trust auth on loopback.

    In front of a pooler it also gets the direct URL, as deployed: a LISTENing client is pinned to it.
    """
    settings = {
        "POOLKIT_POOLED_URL" if pooled else "POOLKIT_DIRECT_URL": upstream_url,
        "POOLKIT_SIDECAR_UPSTREAM": "pooled" if pooled else "direct",
        "POOLKIT_SIDECAR_MAX_SIZE": "3",
        "POOLKIT_SIDECAR_AUTH_TYPE": "trust",
    }
    if pooled:
        settings["POOLKIT_DIRECT_URL"] = direct_url
    return benchlib.start_sidecar(settings, port, http_port)


def cancel_once(url: str, rows: int) -> tuple[float, float, int]:
    """(seconds cancel_safe() blocked, seconds from the cancel to the error, bytes received in between)."""
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        received = 0
        after = -1
        started = left = 0.0
        try:
            with cur.copy(f"COPY (SELECT generate_series(1, {rows})) TO STDOUT") as copy:
                for block in copy:
                    received += len(block)
                    if after >= 0:
                        after += len(block)
                    elif received >= _CANCEL_AFTER:
                        started = time.perf_counter()
                        conn.cancel_safe()
                        left = time.perf_counter() - started
                        after = 0
        except errors.QueryCanceled:
            return left, time.perf_counter() - started, after
        raise RuntimeError(f"the COPY of {rows} rows ended before the cancel landed: raise --rows")


def _seen(marker: bytes, tail: bytes, data: bytes) -> bool:
    """Is ``marker`` in ``data`` or across its start and the ``tail`` of the read before it?"""
    return marker in data or marker in tail + data[: len(marker)]


async def _cancel(port: int, key: tuple[int, int], ca_file: str | None) -> float:
    """Send a CancelRequest; when (perf_counter) the server closed the connection: the cancel was passed on."""
    reader, writer = await open_raw(port, ca_file)
    writer.write(protocol.cancel_request(*key))
    await writer.drain()
    await reader.read()
    closed = time.perf_counter()
    writer.close()
    return closed


async def _fast_cancel_once(
    port: int, user: str, password: str | None, ca_file: str | None, rows: int
) -> tuple[float, float, int]:
    reader, writer, key = await raw_login(port, user=user, password=password, ca_file=ca_file)
    writer.write(protocol.query(f"COPY (SELECT generate_series(1, {rows})) TO STDOUT"))
    received, after = 0, -1
    started = 0.0
    cancel: asyncio.Task[float] | None = None
    tail = b""
    try:
        while True:
            data = await reader.read(1 << 20)
            if not data:
                raise RuntimeError("the connection closed")
            received += len(data)
            if after >= 0:
                after += len(data)
            elif received >= _CANCEL_AFTER:
                started = time.perf_counter()
                after = 0
                cancel = asyncio.ensure_future(_cancel(port, key, ca_file))
            # The ErrorResponse's SQLSTATE field, found without walking every message (that would make this
            # client the bottleneck); digits of the series never contain a C.
            if _seen(b"C57014\x00", tail, data):
                landed = time.perf_counter() - started
                assert cancel is not None
                return await cancel - started, landed, after
            if _seen(_READY, tail, data):
                raise RuntimeError(f"the COPY of {rows} rows ended before the cancel landed: raise --rows")
            tail = data[-8:]
    finally:
        writer.close()


def fast_cancel_once(
    port: int, user: str, password: str | None, ca_file: str | None, rows: int
) -> tuple[float, float, int]:
    """Like :func:`cancel_once` with a client that reads as fast as a C client (the raw protocol, 1 MB reads)."""
    return asyncio.run(_fast_cancel_once(port, user, password, ca_file, rows))


async def _beside_copy(port: int, user: str, password: str | None, ca_file: str | None, rows: int) -> list[float]:
    copy_reader, copy_writer, _ = await raw_login(port, user=user, password=password, ca_file=ca_file)
    reader, writer, _ = await raw_login(port, user=user, password=password, ca_file=ca_file)
    copy_writer.write(protocol.query(f"COPY (SELECT generate_series(1, {rows})) TO STDOUT"))

    async def read_copy() -> None:
        tail = b""
        while True:
            data = await copy_reader.read(1 << 20)
            if not data or _seen(_READY, tail, data):
                return
            tail = data[-8:]

    copying = asyncio.ensure_future(read_copy())
    latencies = []
    deadline = time.perf_counter() + 120
    while not copying.done() and time.perf_counter() < deadline:
        sent = time.perf_counter()
        writer.write(protocol.query("SELECT 1"))
        answer = b""
        while not answer.endswith(_READY):
            answer += await reader.read(65536)
        latencies.append(time.perf_counter() - sent)
    await copying
    copy_writer.close()
    writer.close()
    return latencies


def select_latencies_beside_copy(
    port: int, user: str, password: str | None, ca_file: str | None, rows: int
) -> list[float]:
    """Round trips of ``SELECT 1`` on one connection while another reads a COPY of ``rows`` as fast as it can."""
    return asyncio.run(_beside_copy(port, user, password, ca_file, rows))


def notify_latencies(listen_url: str, notify_url: str, count: int) -> list[float]:
    """Seconds from just before each NOTIFY is sent to its arrival at a listener connected to ``listen_url``."""
    arrived: queue.Queue[float] = queue.Queue()
    with psycopg.connect(listen_url, autocommit=True) as listener, psycopg.connect(notify_url, autocommit=True) as tx:
        listener.execute("LISTEN bench_cancel")

        def listen() -> None:
            for _ in listener.notifies(stop_after=count, timeout=60):
                arrived.put(time.perf_counter())

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        latencies = []
        for i in range(count):
            sent = time.perf_counter()
            tx.execute(f"NOTIFY bench_cancel, '{i}'")
            latencies.append(arrived.get(timeout=30) - sent)
        thread.join(timeout=30)
    return latencies


def spread(values: list[float], scale: float, unit: str) -> str:
    ordered = sorted(values)
    return f"{statistics.median(ordered) * scale:8.2f} {unit} ({ordered[0] * scale:.2f}-{ordered[-1] * scale:.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--notifies", type=int, default=300)
    args = parser.parse_args()
    with DevStack() as stack:
        direct = stack.url(via="direct")
        targets = {"direct": direct, "pgbouncer": stack.url(via="pgbouncer", sslmode="disable")}
        direct_tls = stack.url(via="direct", sslmode="require")
        children = []
        sidecar_ports: dict[str, int] = {}
        try:
            for name, upstream, pooled in (
                ("sidecar", direct_tls, False),
                ("sidecar->pgbouncer", stack.url(via="pgbouncer", sslmode="require"), True),
            ):
                port = free_port()
                children.append(start_sidecar(upstream, port, free_port(), pooled=pooled, direct_url=direct_tls))
                targets[name] = f"postgresql://{stack.app_user}@127.0.0.1:{port}/{stack.database}?sslmode=disable"
                sidecar_ports[name] = port
            ports = {"direct": stack.pg_port, "pgbouncer": stack.pgbouncer_port, **sidecar_ports}
            for client in ("fast", "psycopg"):
                rows = args.rows * 4 if client == "fast" else args.rows
                print(f"\n{client} client: cancel after 1 MB of COPY (SELECT generate_series(1, {rows})) TO STDOUT")
                print(f"{'target':<20} {'cancel leaves':>30} {'error arrives':>30} {'bytes after the cancel':>32}")
                for name, url in targets.items():
                    # The fast client logs in itself: SCRAM to PostgreSQL (TLS) and PgBouncer, trust to the sidecars.
                    password = stack.app_password if name in ("direct", "pgbouncer") else None
                    ca_file = str(stack.ca_file) if name == "direct" else None
                    results = []
                    for _ in range(args.rounds + 1):  # the first warms: connections open, code paths hot
                        if client == "fast":
                            results.append(fast_cancel_once(ports[name], stack.app_user, password, ca_file, rows))
                        else:
                            results.append(cancel_once(url, rows))
                    results = results[1:]
                    left = spread([r[0] for r in results], 1000, "ms")
                    landed = spread([r[1] for r in results], 1000, "ms")
                    after = spread([float(r[2]) for r in results], 1 / 1e6, "MB")
                    print(f"{name:<20} {left:>30} {landed:>30} {after:>32}")
            rows = args.rows * 4
            print(f"\nSELECT 1 on one connection while another reads COPY (SELECT generate_series(1, {rows}))")
            for name in targets:
                password = stack.app_password if name in ("direct", "pgbouncer") else None
                ca_file = str(stack.ca_file) if name == "direct" else None
                latencies = select_latencies_beside_copy(ports[name], stack.app_user, password, ca_file, rows)
                ordered = sorted(latencies)
                print(
                    f"{name:<20} {len(ordered):6} round trips: median {statistics.median(ordered) * 1e3:.2f} ms, "
                    f"p99 {ordered[int(len(ordered) * 0.99) - 1] * 1e3:.2f} ms, max {ordered[-1] * 1e3:.2f} ms"
                )
            print(f"\nLISTEN/NOTIFY delivery, {args.notifies} notifications sent by a direct connection")
            for name, url in targets.items():
                if name == "pgbouncer":
                    continue
                latencies = notify_latencies(url, direct, args.notifies)
                p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1]
                print(f"{name:<20} median {statistics.median(latencies) * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms")
        finally:
            for child in children:
                child.terminate()
                child.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
