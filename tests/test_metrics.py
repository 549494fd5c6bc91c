"""Library-pool metrics and events on the real stack, scraped over HTTP from ``poolkit.metrics.serve()``.

Every test runs for asyncpg, psycopg (async) and psycopg's sync pool, each on its own pool ``name`` so
the series of one test never mix with another's (the process-wide registry is shared by the session).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prom_harness import Samples, ascrape

import poolkit
import poolkit.metrics
from poolkit.dev.devstack import DevStack
from poolkit.errors import PoolTimeout

DRIVERS = ("asyncpg", "psycopg", "psycopg-sync")
SECRET = "SECRET-PARAM-123"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def metrics_url() -> Iterator[str]:
    """``poolkit.metrics.serve()`` on a free loopback port, for the whole module."""
    server = poolkit.metrics.serve(0)
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()


class LogLines(logging.Handler):
    """Collects the finished lines poolkit hands to its stdlib loggers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def events(self, event: str, pool: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            data = json.loads(line)
            if data.get("event") == event and data.get("pool") == pool:
                found.append(data)
        return found


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    handler = LogLines()
    logger = logging.getLogger("poolkit")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Target:
    """One pool under test, with the same coroutine API for the async pools and the (threaded) sync one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.sync = kind == "psycopg-sync"
        self.driver_label = kind
        self.pool: Any = None

    def sql(self, text: str) -> str:
        """Write SQL with asyncpg's ``$n``; psycopg gets ``%s``."""
        return text if self.kind == "asyncpg" else re.sub(r"\$\d+", "%s", text)

    async def create(self, **settings: Any) -> Target:
        if self.sync:
            self.pool = await asyncio.to_thread(poolkit.create_sync_pool, **settings)
        else:
            self.pool = await poolkit.create_pool(driver=self.kind, **settings)
        return self

    async def fetch(self, sql: str, *args: Any) -> Any:
        if self.sync:
            return await asyncio.to_thread(self.pool.fetch, self.sql(sql), *args)
        return await self.pool.fetch(self.sql(sql), *args)

    async def hold(self, seconds: float, acquired: threading.Event | None = None) -> None:
        """Check a connection out and keep it for ``seconds``; PoolTimeout if none came in time."""
        if self.sync:

            def run() -> None:
                with self.pool.acquire():
                    if acquired is not None:
                        acquired.set()
                    time.sleep(seconds)

            await asyncio.to_thread(run)
            return
        async with self.pool.acquire():
            if acquired is not None:
                acquired.set()
            await asyncio.sleep(seconds)

    async def statements(self, route_pool: Any, statements: list[str]) -> list[str | None]:
        """Run ``statements`` on one connection; the SQLSTATE of each (None when it succeeded)."""

        def sync_run() -> list[str | None]:
            out: list[str | None] = []
            with route_pool.acquire() as conn:
                for text in statements:
                    try:
                        conn.execute(text)
                        conn.commit()
                        out.append(None)
                    except Exception as exc:
                        conn.rollback()
                        out.append(exc.sqlstate)  # type: ignore[attr-defined]
            return out

        if self.sync:
            return await asyncio.to_thread(sync_run)
        out: list[str | None] = []
        async with route_pool.acquire() as conn:
            for text in statements:
                try:
                    await conn.execute(text)
                    if self.kind == "psycopg":
                        await conn.commit()
                    out.append(None)
                except Exception as exc:
                    if self.kind == "psycopg":
                        await conn.rollback()
                    out.append(exc.sqlstate)  # type: ignore[attr-defined]
        return out

    def direct(self) -> Any:
        return self.pool.direct()

    async def close(self) -> None:
        if self.pool is None:
            return
        if self.sync:
            await asyncio.to_thread(self.pool.close)
        else:
            await self.pool.close()
        # asyncpg reports closed connections through loop callbacks: let them run.
        await asyncio.sleep(0.05)


@pytest.fixture(params=DRIVERS)
async def target(request: pytest.FixtureRequest, stack_env: DevStack) -> Any:
    t = Target(request.param)
    yield t
    await t.close()


async def wait_for(url: str, predicate: Any, timeout: float = 20.0) -> Samples:
    """Scrape until ``predicate(samples)`` holds (events that land a moment later, e.g. idle closes)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await ascrape(url)
        if predicate(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- slow queries


async def test_five_slow_queries_count_exactly_five_and_log_no_parameters(
    target: Target, metrics_url: str, log_lines: LogLines
) -> None:
    name = unique("slow")
    await target.create(name=name, max_size=3, pool_mode="transaction")  # slow_query_seconds: default 1.0
    labels = {"pool": name, "driver": target.driver_label, "route": "pooled"}

    before = await ascrape(metrics_url)
    # Pre-initialised: the series exists at zero before the first slow query.
    assert before.value("poolkit_slow_queries_total", **labels) == 0
    assert before.value("poolkit_query_errors_total", sqlstate_class="23", **labels) == 0
    assert before.value("poolkit_connections_closed_total", reason="lifetime", **labels) == 0

    rows = await asyncio.gather(*(target.fetch("select pg_sleep($1), $2::text", 1.1, SECRET) for _ in range(5)))
    assert [r[0][1] for r in rows] == [SECRET] * 5  # the parameter really reached the server

    after = await ascrape(metrics_url)
    assert after.value("poolkit_slow_queries_total", **labels) == 5
    assert after.value("poolkit_query_duration_seconds_bucket", le="1.0", **labels) == 0
    assert after.value("poolkit_query_duration_seconds_count", **labels) >= 5
    assert after.value("poolkit_query_duration_seconds_sum", **labels) >= 5 * 1.1 - 0.01

    events = log_lines.events("slow_query", name)
    assert len(events) == 5
    expected_sql = target.sql("select pg_sleep($1), $2::text")
    for event in events:
        assert event["level"] == "warning"
        assert event["duration_s"] >= 1.0
        assert event["threshold_s"] == 1.0
        assert (event["driver"], event["route"], event["sql"]) == (
            target.driver_label,
            "pooled",
            expected_sql,
        )
        assert "timestamp" in event
    # Never parameters: not in any line poolkit logged, not in the exposition.
    assert log_lines.lines
    assert not [line for line in log_lines.lines if SECRET in line]
    assert SECRET not in after.text


async def test_asyncpg_hands_the_parameter_to_the_hook_and_poolkit_drops_it(
    stack_env: DevStack, log_lines: LogLines
) -> None:
    """The failure the test above guards against: the driver's hook record does carry the parameter."""
    name = unique("hook")
    pool = await poolkit.create_pool(driver="asyncpg", name=name, slow_query_seconds=0.05, pool_mode="transaction")
    seen: list[Any] = []
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(seen.append)
            await conn.fetch("select pg_sleep($1), $2::text", 0.1, SECRET)
            conn.remove_query_logger(seen.append)
        await asyncio.sleep(0.05)
    finally:
        await pool.close()
    assert any(SECRET in map(str, record.args) for record in seen)  # what a naive logger would print
    assert len(log_lines.events("slow_query", name)) == 1
    assert not [line for line in log_lines.lines if SECRET in line]


# --------------------------------------------------------------------------- exhaustion


async def test_three_holders_on_a_one_connection_pool_give_two_timeouts(
    target: Target, metrics_url: str, log_lines: LogLines
) -> None:
    name = unique("exhaust")
    await target.create(name=name, max_size=1, acquire_timeout=0.5, pool_mode="transaction")
    labels = {"pool": name, "driver": target.driver_label, "route": "pooled"}

    acquired = threading.Event()
    holder = asyncio.ensure_future(target.hold(2.0, acquired))
    while not acquired.is_set():
        await asyncio.sleep(0.01)
    waiters = [asyncio.ensure_future(target.hold(0.0)) for _ in range(2)]

    # Scrape while they wait: the gauges are read from the pool at scrape time.
    max_waiting = 0
    during: Samples | None = None
    while not all(w.done() for w in waiters):
        samples = await ascrape(metrics_url)
        waiting = samples.value("poolkit_pool_waiting_requests", **labels)
        if waiting > max_waiting:
            max_waiting, during = int(waiting), samples
        await asyncio.sleep(0.02)
    results = await asyncio.gather(*waiters, return_exceptions=True)
    await holder

    assert [type(r) for r in results] == [PoolTimeout, PoolTimeout]
    assert max_waiting == 2
    assert during is not None
    assert during.value("poolkit_pool_connections", state="in_use", **labels) == 1
    assert during.value("poolkit_pool_connections", state="idle", **labels) == 0
    assert during.value("poolkit_pool_max_connections", **labels) == 1
    assert during.value("poolkit_pool_min_connections", **labels) == 0

    after = await ascrape(metrics_url)
    assert after.value("poolkit_pool_acquire_timeouts_total", **labels) == 2
    assert after.value("poolkit_pool_acquire_waits_total", **labels) == 2
    assert after.value("poolkit_pool_waiting_requests", **labels) == 0
    assert after.value("poolkit_pool_connections", state="in_use", **labels) == 0
    assert after.value("poolkit_pool_connections", state="idle", **labels) == 1
    # Samples: the open() check, the holder, and the two callers who gave up after 0.5 s.
    total = after.value("poolkit_pool_acquire_duration_seconds_count", **labels)
    at_most_half = after.bucket("poolkit_pool_acquire_duration_seconds", "0.5", **labels)
    assert total == 4
    assert total - at_most_half == 2  # exactly the two timed-out waits are above 0.5 s
    assert after.value("poolkit_pool_acquire_duration_seconds_sum", **labels) >= 1.0

    events = log_lines.events("pool_exhausted", name)
    assert len(events) == 2
    for event in events:
        assert event["size"] == 1
        assert event["in_use"] == 1
        assert event["waiting"] in (1, 2)
        assert event["timeout_s"] == 0.5
        assert "POOLKIT_ACQUIRE_TIMEOUT" in event["hint"]
        assert (event["driver"], event["route"]) == (target.driver_label, "pooled")


# --------------------------------------------------------------------------- errors


async def test_query_errors_are_counted_by_sqlstate_class(target: Target, metrics_url: str) -> None:
    name = unique("errors")
    await target.create(name=name, max_size=1, pool_mode="transaction")
    direct = target.direct()  # a temp table needs a session: the direct route
    labels = {"pool": name, "driver": target.driver_label, "route": "direct"}

    states = await target.statements(
        direct,
        [
            "create temp table errs (id int primary key)",
            "insert into errs values (1)",
            "insert into errs values (1)",  # 23505 unique_violation
            "select 1/0",  # 22012 division_by_zero
            "selec 1",  # 42601 syntax_error
            "insert into errs values (2)",
        ],
    )
    assert states == [None, None, "23505", "22012", "42601", None]
    async with direct.acquire() if not target.sync else contextlib.nullcontext():
        pass  # a second checkout: the first one's release reset (asyncpg) and a checkout check (psycopg)

    after = await ascrape(metrics_url)
    # Exactly the six statements: not the pool's own asyncpg reset or psycopg_pool check on checkout.
    assert after.value("poolkit_query_duration_seconds_count", **labels) == 6
    assert after.value("poolkit_query_errors_total", sqlstate_class="23", **labels) == 1
    assert after.value("poolkit_query_errors_total", sqlstate_class="22", **labels) == 1
    assert after.value("poolkit_query_errors_total", sqlstate_class="42", **labels) == 1
    others = [
        v
        for lab, v in after.find("poolkit_query_errors_total", **labels)
        if lab["sqlstate_class"] not in ("23", "22", "42")
    ]
    assert others
    assert not any(others)
    # The pooled route of the same pool saw none of it.
    pooled = {**labels, "route": "pooled"}
    assert sum(v for _, v in after.find("poolkit_query_errors_total", **pooled)) == 0


# --------------------------------------------------------------------------- connection lifecycle


async def test_connections_opened_and_closed_by_idle_and_shutdown(target: Target, metrics_url: str) -> None:
    name = unique("life")
    await target.create(name=name, max_size=1, idle_timeout=0.5, pool_mode="transaction")
    labels = {"pool": name, "driver": target.driver_label, "route": "pooled"}

    def closed(samples: Samples, reason: str) -> float:
        return samples.value("poolkit_connections_closed_total", reason=reason, **labels)

    s = await ascrape(metrics_url)
    assert s.value("poolkit_connections_opened_total", **labels) == 1  # create_pool checks it can connect

    # Left idle longer than idle_timeout, the connection is closed by the pool: reason "idle".
    s = await wait_for(metrics_url, lambda s: closed(s, "idle") >= 1)
    assert closed(s, "idle") == 1
    assert s.value("poolkit_pool_connections", state="idle", **labels) == 0

    assert (await target.fetch("select $1::int", 7))[0][0] == 7
    s = await ascrape(metrics_url)
    assert s.value("poolkit_connections_opened_total", **labels) == 2

    await target.close()
    s = await wait_for(metrics_url, lambda s: closed(s, "shutdown") >= 1)
    assert closed(s, "shutdown") == 1
    assert closed(s, "idle") == 1
    assert closed(s, "error") == 0
    assert closed(s, "lifetime") == 0
    assert s.value("poolkit_connect_duration_seconds_count", **labels) == 2
    assert sum(v for _, v in s.find("poolkit_connect_errors_total", **labels)) == 0
    # A closed pool's gauges leave the scrape with it.
    assert s.find("poolkit_pool_max_connections", **labels) == []


async def test_connect_errors_are_counted_by_reason(stack_env: DevStack, metrics_url: str) -> None:
    name = unique("connfail")
    bad = stack_env.url(via="direct", password="wrong-password")
    with pytest.raises(poolkit.AuthenticationFailed):
        await poolkit.create_pool(driver="asyncpg", name=name, pooled_url=bad, connect_timeout=5)
    s = await ascrape(metrics_url)
    labels = {"pool": name, "driver": "asyncpg", "route": "pooled"}
    assert s.value("poolkit_connect_errors_total", reason="auth", **labels) == 1
    assert s.value("poolkit_connections_opened_total", **labels) == 0
    assert "wrong-password" not in s.text
