"""Cancel keys and cancels: keys that cannot be a real pid, and a cancel that does not wait behind a busy relay.

Precise timings are in bench/bench_cancel.py; the bounds here only have to hold on a loaded 2-core box.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from psycopg import errors

from poolkit.devstack import DevStack
from poolkit.sidecar import protocol

from .conftest import SidecarThread
from .test_startup import login

Factory = Callable[..., SidecarThread]
PID_MAX_LIMIT = 1 << 22  # Linux: pid_max can be raised up to this, never above


async def _logins(port: int, count: int) -> list[tuple[int, int]]:
    greetings = await asyncio.gather(*(login(port, {}) for _ in range(count)))
    keys = [g.key for g in greetings]
    assert all(key is not None for key in keys)
    return [key for key in keys if key is not None]


async def _cancel(port: int, pid: int, secret: int) -> None:
    """Send a CancelRequest and wait until the sidecar closes the connection (it is then forwarded or dropped)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(protocol.cancel_request(pid, secret))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 30) == b""
    writer.close()


def test_backend_keys_are_random_unique_and_never_a_real_pid(sidecar: SidecarThread, stack: DevStack) -> None:
    keys = asyncio.run(_logins(sidecar.port, 60))
    pids = [pid for pid, _ in keys]
    assert all(PID_MAX_LIMIT < pid <= 0x7FFFFFFF for pid in pids), pids
    assert len(set(pids)) == len(pids)
    assert len({secret for _, secret in keys}) == len(keys)
    assert sorted(pids) != pids or len(pids) < 3  # not counted up
    with (
        psycopg.connect(stack.url(via="direct"), autocommit=True) as admin,
        psycopg.connect(sidecar.url(), autocommit=True) as client,
        psycopg.connect(stack.url(via="direct"), autocommit=True) as bystander,
    ):
        told = client.info.backend_pid
        assert told > PID_MAX_LIMIT
        # The pattern that made counted keys dangerous: terminating "my backend" by the pid the client was told.
        # A real backend's pid is below the limit, and terminating by it kills that backend...
        real = bystander.info.backend_pid
        assert real <= PID_MAX_LIMIT
        # ...while the pid the sidecar told its client is nobody's: nothing is terminated.
        assert admin.execute("SELECT pg_terminate_backend(%s)", (told,)).fetchone() == (False,)
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        assert client.execute("SELECT 2").fetchone() == (2,)
        assert admin.execute("SELECT pg_terminate_backend(%s)", (real,)).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError):
            bystander.execute("SELECT 1")


def test_a_cancel_needs_the_right_secret_and_still_works(sidecar: SidecarThread) -> None:
    with psycopg.connect(sidecar.url(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        started = threading.Event()
        outcome: list[object] = []

        def run() -> None:
            started.set()
            try:
                outcome.append(conn.execute("SELECT 'done' FROM pg_sleep(1.5)").fetchone())
            except psycopg.Error as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        started.wait()
        _wait_for(lambda: sidecar.call(lambda app: any(c.pending > 0 for c in app.pool.clients)))
        # The right pid with a wrong secret: dropped (the sidecar closed the connection), the query runs on.
        secret = sidecar.call(lambda app: app.cancel_keys[pid].secret_key)
        asyncio.run(_cancel(sidecar.port, pid, secret ^ 1))
        thread.join(timeout=30)
        assert outcome == [("done",)]
        # The right key cancels.
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        with pytest.raises(errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
        assert conn.execute("SELECT 3").fetchone() == (3,)


def _cancel_streaming_copy(url: str, rows: int) -> tuple[float, float, int]:
    """(seconds cancel_safe() blocked, seconds until the QueryCanceled error, bytes received in between)."""
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        received, after = 0, -1
        started = left = 0.0
        try:
            with cur.copy(f"COPY (SELECT generate_series(1, {rows})) TO STDOUT") as copy:
                for block in copy:
                    received += len(block)
                    if after >= 0:
                        after += len(block)
                    elif received >= 1 << 20:
                        started = time.perf_counter()
                        conn.cancel_safe()
                        left = time.perf_counter() - started
                        after = 0
        except errors.QueryCanceled:
            return left, time.perf_counter() - started, after
        raise AssertionError(f"the whole result ({received} bytes) arrived: the cancel never landed")


@pytest.mark.parametrize("upstream", ["postgresql", "pgbouncer"])
def test_a_cancel_does_not_wait_behind_a_result_of_small_messages(
    sidecar_factory: Factory, stack: DevStack, upstream: str
) -> None:
    if upstream == "pgbouncer":
        sidecar = sidecar_factory(pooled_url=stack.url(via="pgbouncer", sslmode="verify-full"), upstream="pooled")
    else:
        sidecar = sidecar_factory()
    rows = 10_000_000  # about 79 MB of 9-byte rows: far more than any socket buffers hold
    direct = _cancel_streaming_copy(stack.url(via="direct"), rows)
    through = _cancel_streaming_copy(sidecar.url(), rows)
    # Generous bounds: the issue measured a 63-97 ms wait before the cancel left the sidecar and about
    # 1 s and 5-6 MB until it landed; bench/bench_cancel.py has the numbers. Here only: the cancel leaves
    # promptly, and the error comes after what the socket buffers held, not after the rest of the result.
    assert through[0] < 1.0, f"cancel_safe() blocked {through[0]:.3f}s (direct: {direct[0]:.3f}s)"
    assert through[1] < direct[1] + 5.0, f"the error came after {through[1]:.3f}s (direct: {direct[1]:.3f}s)"
    assert through[2] < direct[2] + 24_000_000, f"{through[2]} bytes after the cancel (direct: {direct[2]})"
    # The sidecar serves on, the canceled server connection included.
    with psycopg.connect(sidecar.url(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM generate_series(1, 1000)").fetchone() == (1000,)


def _wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
