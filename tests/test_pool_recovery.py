"""Recovery of the library pools: connections that died while idle never reach a caller, and the pools serve
again after PostgreSQL restarts, with no manual step.

A private DevStack (the restart must not disturb the session's stack), with its transaction-mode PgBouncer
and a second PgBouncer that drops clients idle for a second (``client_idle_timeout``, as hosted poolers
do). Every case runs for asyncpg, psycopg (async) and psycopg's sync pool, straight to PostgreSQL and
through PgBouncer, and shows the raw driver pool, built the same way, handing out the dead connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from prom_harness import Samples
from prometheus_client import generate_latest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

import poolkit
import poolkit.metrics
from poolkit.dev.devstack import DevStack, PgBouncerHandle

DRIVERS = ("asyncpg", "psycopg", "psycopg-sync")
SIZE = 2
SERVE_AGAIN_WITHIN = 15.0  # seconds after restart_postgres() returns; generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def rstack() -> Iterator[DevStack]:
    with DevStack() as started:
        yield started


@pytest.fixture(scope="module")
def idle_bouncer(rstack: DevStack) -> Iterator[PgBouncerHandle]:
    """A PgBouncer that closes client connections idle for more than a second."""
    bouncer = rstack.start_pgbouncer(client_idle_timeout="1")
    yield bouncer
    bouncer.stop()


def scrape() -> Samples:
    return Samples(generate_latest(poolkit.metrics.scrape_registry()).decode())


class Pair:
    """A raw driver pool and a poolkit pool, same driver, same URL, same size, each with its application_name."""

    def __init__(self, driver: str, url: str, *, pooler: bool, ca_file: str) -> None:
        self.driver = driver
        self.url = url
        self.pooler = pooler
        self.route = "pgbouncer" if pooler else "direct"
        self.ca_file = ca_file
        tag = uuid.uuid4().hex[:8]
        self.raw_app = f"raw-{tag}"
        self.kit_app = f"kit-{tag}"
        self.name = f"recover-{tag}"
        self.raw: Any = None
        self.kit: Any = None

    @property
    def sync(self) -> bool:
        return self.driver == "psycopg-sync"

    async def open(self, *, raw: bool = True) -> Pair:
        raw_url = f"{self.url}&application_name={self.raw_app}"
        if not raw:
            pass
        elif self.driver == "asyncpg":
            self.raw = await asyncpg.create_pool(
                raw_url, min_size=SIZE, max_size=SIZE, statement_cache_size=0 if self.pooler else 100
            )
        elif self.driver == "psycopg":
            self.raw = AsyncConnectionPool(
                raw_url, min_size=SIZE, max_size=SIZE, open=False, kwargs={"prepare_threshold": None}
            )
            await self.raw.open(wait=True)
        else:
            self.raw = ConnectionPool(
                raw_url, min_size=SIZE, max_size=SIZE, open=False, kwargs={"prepare_threshold": None}
            )
            await asyncio.to_thread(self.raw.open, wait=True)
        settings = {
            "name": self.name,
            "pooled_url": self.url,
            "pool_mode": "transaction" if self.pooler else "direct",
            "sslrootcert": self.ca_file,
            "application_name": self.kit_app,
            "min_size": SIZE,
            "max_size": SIZE,
            "profile": "server",
        }
        if self.sync:
            self.kit = await asyncio.to_thread(poolkit.create_sync_pool, **settings)
        else:
            self.kit = await poolkit.create_pool(driver=self.driver, **settings)
        await self.warm()
        return self

    async def warm(self) -> None:
        """Both connections of both pools open and used once."""
        raw = [self.raw_query() for _ in range(SIZE)] if self.raw is not None else []
        await asyncio.gather(*raw, *(self.kit_query(0.05) for _ in range(SIZE)))

    async def raw_query(self) -> Any:
        if self.driver == "asyncpg":
            async with self.raw.acquire() as conn:
                return await conn.fetchval("SELECT pg_backend_pid()")
        if self.driver == "psycopg":
            async with self.raw.connection() as conn:
                return (await (await conn.execute("SELECT pg_backend_pid()")).fetchone())[0]

        def run() -> Any:
            with self.raw.connection() as conn:
                return conn.execute("SELECT pg_backend_pid()").fetchone()[0]

        return await asyncio.to_thread(run)

    async def kit_query(self, sleep: float = 0.0) -> Any:
        sql = f"SELECT pg_backend_pid() FROM pg_sleep({sleep})"
        if self.sync:
            return await asyncio.to_thread(self.kit.fetchval, sql)
        return await self.kit.fetchval(sql)

    async def close(self) -> None:
        for pool in (self.raw, self.kit):
            if pool is None:
                continue
            # A raw pool left with dead connections may complain while closing; the test is over by then.
            with contextlib.suppress(Exception):
                if self.sync:
                    await asyncio.to_thread(pool.close)
                else:
                    await pool.close()


def _terminate(stack: DevStack, *apps: str) -> set[int]:
    """pg_terminate_backend on every backend of these application_names; returns once they are gone."""
    with psycopg.connect(stack.superuser_url, autocommit=True) as admin:
        pids = {
            r[0]
            for r in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = ANY(%s)", (list(apps),)
            ).fetchall()
        }
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (list(pids),))
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)).fetchone()[0]:
            assert time.monotonic() < deadline, "terminated backends did not go away"
            time.sleep(0.05)
    return pids


def _wait_idle_clients_dropped(bouncer: PgBouncerHandle) -> None:
    """Until the bouncer has no client left but the admin console asking (only this test uses it)."""
    deadline = time.monotonic() + 10
    while any(row["database"] != "pgbouncer" for row in bouncer.admin("SHOW CLIENTS")):
        assert time.monotonic() < deadline, "PgBouncer did not drop the idle clients"
        time.sleep(0.1)


def _closed_by_error(name: str, driver: str) -> float:
    return scrape().value("poolkit_connections_closed_total", pool=name, driver=driver, route="pooled", reason="error")


@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
@pytest.mark.parametrize("driver", DRIVERS)
async def test_connections_that_died_while_idle_never_reach_a_caller(
    driver: str, route: str, rstack: DevStack, idle_bouncer: PgBouncerHandle
) -> None:
    url = rstack.url(via="direct") if route == "direct" else idle_bouncer.url()
    pair = await Pair(driver, url, pooler=route == "pgbouncer", ca_file=str(rstack.ca_file)).open()
    try:
        errors_before = _closed_by_error(pair.name, driver)
        old_pids: set[int] = set()
        # Break every idle connection of both pools, and let the event loop not run meanwhile (blocking
        # calls below): the driver learns nothing until it next touches the socket, as after a serverless
        # freeze or a busy loop. Direct: the server ends the backends. PgBouncer: it drops idle clients.
        if route == "direct":
            old_pids = _terminate(rstack, pair.raw_app, pair.kit_app)
        else:
            _wait_idle_clients_dropped(idle_bouncer)
        time.sleep(0.2)  # the FATAL message and EOF are in the sockets now, unread

        # Without poolkit's checkout check: the raw pool hands out a dead connection and the query fails.
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, psycopg.OperationalError, OSError)):
            await pair.raw_query()

        # With it: the first acquire+query after the break succeeds, on a new connection.
        pid = await pair.kit_query()
        assert isinstance(pid, int)
        assert pid not in old_pids
        # And every connection the pool hands out from now on works (none of the dead ones is left).
        pids = await asyncio.gather(*(pair.kit_query(0.05) for _ in range(SIZE * 2)))
        assert not set(pids) & old_pids
        # The dead connections were counted as closed by error.
        await asyncio.sleep(0.05)
        assert _closed_by_error(pair.name, driver) - errors_before >= 1
    finally:
        await pair.close()


async def test_pools_serve_again_after_postgres_restarts(rstack: DevStack) -> None:
    """One restart for every driver and route: afterwards each pool's first query succeeds, within a bound."""
    pairs = [
        await Pair(driver, url, pooler=pooler, ca_file=str(rstack.ca_file)).open(raw=False)
        for driver in DRIVERS
        for url, pooler in ((rstack.url(via="direct"), False), (rstack.url(via="pgbouncer"), True))
    ]
    try:
        await asyncio.to_thread(rstack.restart_postgres)  # the apps' event loop keeps running meanwhile
        restarted = time.monotonic()
        for pair in pairs:
            attempts = 0
            while True:
                attempts += 1
                try:
                    await pair.kit_query()
                    break
                except Exception:
                    assert time.monotonic() - restarted < SERVE_AGAIN_WITHIN, f"{pair.driver} did not recover"
                    await asyncio.sleep(0.1)
            # No manual step and no failed attempt: dead connections are replaced before a caller sees them.
            assert attempts == 1, (pair.driver, pair.route, attempts)
            # A burst on every connection the pool has: none of the dead ones is handed out.
            await asyncio.gather(*(pair.kit_query(0.05) for _ in range(SIZE * 2)))
        assert time.monotonic() - restarted < SERVE_AGAIN_WITHIN
    finally:
        for pair in pairs:
            await pair.close()
