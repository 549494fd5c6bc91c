"""Exhaustion: 100 callers on a pool of one connection, each served or refused on time, the metrics exact.

For asyncpg, psycopg (async) and psycopg's sync pool (100 threads). The one connection is held by a long
query; the callers either get it (after the holder) or PoolTimeout at the acquire timeout, measured per
caller within ±10 %. Nobody hangs (an outer deadline), and the numbers scraped over HTTP from
``poolkit.metrics.serve()`` agree exactly with what the callers saw.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prom_harness import Samples, ascrape

import poolkit
import poolkit.metrics
from poolkit.dev.devstack import DevStack
from poolkit.errors import PoolTimeout

WAITERS = 100
TIMEOUT = 1.5  # the acquire timeout T; a PoolTimeout must come within T ± 10 %
HOLD = 0.8  # the long query that holds the only connection
SERVED_QUERY = "SELECT pg_sleep(0.02)"  # what a served caller runs: long enough that not all 100 get through


@pytest.fixture(scope="module")
def metrics_url() -> Iterator[str]:
    server = poolkit.metrics.serve(0)
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()


class Outcome:
    """What one caller saw: served (and how long it waited for the connection) or PoolTimeout (and when)."""

    def __init__(self) -> None:
        self.kind = "pending"
        self.seconds = 0.0
        self.error: BaseException | None = None


async def _async_waiter(pool: poolkit.Pool, out: Outcome) -> None:
    started = time.monotonic()
    try:
        async with pool.acquire() as conn:
            out.kind, out.seconds = "served", time.monotonic() - started
            await conn.execute(SERVED_QUERY)
    except PoolTimeout as exc:
        out.kind, out.seconds, out.error = "timeout", time.monotonic() - started, exc
    except BaseException as exc:  # recorded, then asserted: nothing but served or PoolTimeout is allowed
        out.kind, out.error = "other", exc


def _sync_waiter(pool: poolkit.SyncPool, out: Outcome, go: threading.Event) -> None:
    go.wait()
    started = time.monotonic()
    try:
        with pool.acquire() as conn:
            out.kind, out.seconds = "served", time.monotonic() - started
            conn.execute(SERVED_QUERY)
    except PoolTimeout as exc:
        out.kind, out.seconds, out.error = "timeout", time.monotonic() - started, exc
    except BaseException as exc:
        out.kind, out.error = "other", exc


async def _until_all_wait(pool: Any, count: int) -> None:
    """Until ``count`` callers are queued (the pool's own counter: no scrape, no guessing a delay)."""
    async with asyncio.timeout(HOLD):
        while pool.stats()["waiting"] < count:
            await asyncio.sleep(0.005)


async def _hold_and_wait(kind: str, pool: Any, outcomes: list[Outcome], while_waiting: Any) -> None:
    """Hold the connection with a long query, start the callers, look at the gauges once while they all wait.

    Only once: a scrape (the exposition built in the server thread, parsed here) costs CPU and the GIL,
    which on a loaded 2-core machine would show up as late timeouts measured by the callers themselves.
    """
    if kind == "psycopg-sync":
        held = threading.Event()

        def holder() -> None:
            with pool.acquire() as conn:
                held.set()
                conn.execute(f"SELECT pg_sleep({HOLD})")

        hold_thread = threading.Thread(target=holder, daemon=True)
        hold_thread.start()
        while not held.is_set():
            await asyncio.sleep(0.005)
        go = threading.Event()
        threads = [threading.Thread(target=_sync_waiter, args=(pool, out, go), daemon=True) for out in outcomes]
        for t in threads:
            t.start()
        go.set()
        await _until_all_wait(pool, len(outcomes))
        await while_waiting()
        while any(t.is_alive() for t in threads):
            await asyncio.sleep(0.02)
        hold_thread.join()
        return

    held_event = asyncio.Event()

    async def holder() -> None:
        async with pool.acquire() as conn:
            held_event.set()
            await conn.execute(f"SELECT pg_sleep({HOLD})")

    hold_task = asyncio.ensure_future(holder())
    await held_event.wait()
    tasks = [asyncio.ensure_future(_async_waiter(pool, out)) for out in outcomes]
    await _until_all_wait(pool, len(outcomes))
    await while_waiting()
    await asyncio.gather(hold_task, *tasks)


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg", "psycopg-sync"])
async def test_hundred_callers_on_one_connection_are_served_or_refused_on_time(
    kind: str, stack: DevStack, metrics_url: str
) -> None:
    name = f"exhaust100-{uuid.uuid4().hex[:8]}"
    settings = {
        "name": name,
        "pooled_url": stack.direct_url,
        "sslrootcert": str(stack.ca_file),
        "max_size": 1,
        "acquire_timeout": TIMEOUT,
        "profile": "server",
    }
    if kind == "psycopg-sync":
        pool: Any = await asyncio.to_thread(poolkit.create_sync_pool, **settings)
    else:
        pool = await poolkit.create_pool(driver=kind, **settings)
    labels = {"pool": name, "driver": kind, "route": "pooled"}
    try:
        before = await ascrape(metrics_url)
        outcomes = [Outcome() for _ in range(WAITERS)]
        during: list[Samples] = []

        async def while_waiting() -> None:
            response = await client.get(metrics_url)
            during.append(Samples(response.text))

        started = time.monotonic()
        async with httpx.AsyncClient(timeout=10.0) as client, asyncio.timeout(TIMEOUT * 4):
            # Nobody hangs: the whole run ends well within the outer deadline.
            await _hold_and_wait(kind, pool, outcomes, while_waiting)
        elapsed = time.monotonic() - started
        after = await ascrape(metrics_url)
        assert await _fetch_one(kind, pool) == 1  # and the pool serves again

        served = [o for o in outcomes if o.kind == "served"]
        timeouts = [o for o in outcomes if o.kind == "timeout"]
        others = [o for o in outcomes if o.kind not in ("served", "timeout")]
        assert others == [], [repr(o.error) for o in others]
        assert len(served) + len(timeouts) == WAITERS
        # Both outcomes happen: the holder lets go before T, and the served callers' queries outlast T.
        assert served
        assert timeouts
        for o in timeouts:
            assert TIMEOUT * 0.9 <= o.seconds <= TIMEOUT * 1.1, o.seconds
            assert isinstance(o.error, PoolTimeout)
            assert o.error.timeout == TIMEOUT
            assert o.error.max_size == 1
        for o in served:
            assert o.seconds <= TIMEOUT * 1.1, o.seconds
        assert elapsed < TIMEOUT * 3

        def delta(samples: Samples, metric: str, **extra: str) -> float:
            return samples.value(metric, **labels, **extra) - before.value(metric, **labels, **extra)

        # The metrics agree exactly with what the callers saw.
        assert delta(after, "poolkit_pool_acquire_timeouts_total") == len(timeouts)
        assert delta(after, "poolkit_pool_acquire_waits_total") == WAITERS  # all found the one connection in use
        # Samples: the holder, every served caller and every caller that gave up (its wait counts too).
        assert delta(after, "poolkit_pool_acquire_duration_seconds_count") == 1 + WAITERS
        slow_waits = delta(after, "poolkit_pool_acquire_duration_seconds_count") - delta(
            after, "poolkit_pool_acquire_duration_seconds_bucket", le="1.0"
        )
        assert slow_waits >= len(timeouts)  # each refused caller waited about T > 1 s
        # While the holder ran, every caller was counted as waiting ...
        (mid,) = during
        assert mid.value("poolkit_pool_waiting_requests", **labels) == WAITERS
        assert mid.value("poolkit_pool_connections", state="in_use", **labels) == 1
        assert after.value("poolkit_pool_waiting_requests", **labels) == 0  # ... and none is left over
        assert after.value("poolkit_pool_connections", state="in_use", **labels) == 0
    finally:
        if kind == "psycopg-sync":
            await asyncio.to_thread(pool.close)
        else:
            await pool.close()


async def _fetch_one(kind: str, pool: Any) -> Any:
    if kind == "psycopg-sync":
        return await asyncio.to_thread(pool.fetchval, "SELECT 1")
    return await pool.fetchval("SELECT 1")
