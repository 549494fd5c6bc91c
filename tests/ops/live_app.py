"""The app process of the live dashboard proof: poolkit pools and sidecar clients under a scripted workload.

Run by tests/ops/test_live_proof.py as `python tests/ops/live_app.py` with the stack's URLs in the environment
and `POOLKIT_LIVE` (JSON: the sidecar's client URL, a sidecar whose upstream is down, a URL nothing listens
on). It opens three library pools (asyncpg, psycopg async, psycopg sync) on the pooled URL, serves their
metrics with `poolkit.metrics.serve(0)` and prints `{"metrics_port": N}`; on a `go` line from stdin it runs
the workload (steady traffic on every pool and through the sidecar, slow queries, errors by class, pool
exhaustion on both sides, connection churn, connect errors, routing, prepared statements, session pins) and
prints `{"result": {...}}` with what each phase observed; it exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import poolkit
import poolkit.metrics

SLOW_SECONDS = 0.1  # the pools' and the sidecar's slow_query_seconds
SLOW_SLEEP = 0.15
# More than 15 slow queries on one pool within 5 minutes: the slow-query alerts' rate()>0.05/s condition.
SLOW_COUNT = 24
HOLD = 4.0  # how long the exhaustion phases keep every connection busy
# The exhaustion phase's waiters give up after this long; the sidecar's query_wait_timeout is the same.
ACQUIRE_TIMEOUT = 1.5
CATALOG = "select c.relname from pg_catalog.pg_class c where c.relkind = 'r' limit 5"


class Outcomes:
    """What the workload saw: counts per event, and the first message of each kind of failure."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.messages: dict[str, str] = {}

    def ok(self, name: str) -> None:
        self.counts[name] += 1

    def failed(self, name: str, exc: BaseException) -> None:
        self.counts[name] += 1
        self.messages.setdefault(name, f"{type(exc).__name__}: {exc}"[:300])

    async def run(self, name: str, call: Callable[[], Awaitable[Any]]) -> None:
        """`call()`, counted as `name` on success and `name:error` on failure (never raises)."""
        try:
            await call()
        except Exception as exc:
            # While the exhaustion phase holds every sidecar server, background traffic times out too.
            kind = "wait timeout" if "query_wait_timeout" in str(exc) else "error"
            self.failed(f"{name}:{kind}", exc)
        else:
            self.ok(name)


async def steady(out: Outcomes, name: str, call: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> None:
    """Background traffic every 50 ms until `stop`, so every rate panel has a line through the whole run."""
    while not stop.is_set():
        await out.run(f"steady {name}", call)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def hold(pool: poolkit.Pool, seconds: float) -> None:
    async with pool.acquire() as conn:
        await conn.execute(f"select pg_sleep({seconds})")


async def waiter(out: Outcomes, name: str, pool: poolkit.Pool, delay: float, timeout: float) -> None:
    await asyncio.sleep(delay)
    try:
        async with pool.acquire(timeout=timeout) as conn:
            await conn.execute("select 1")
    except poolkit.PoolTimeout as exc:
        out.failed(f"{name} timeout", exc)
    else:
        out.ok(f"{name} served after waiting")


async def sidecar_waiter(out: Outcomes, url: str, delay: float) -> None:
    await asyncio.sleep(delay)
    conn = await asyncpg.connect(url, statement_cache_size=0)
    try:
        await conn.execute("select 1")
    except asyncpg.PostgresError as exc:
        out.failed("sidecar wait timeout" if "query_wait_timeout" in str(exc) else "sidecar waiter:error", exc)
    else:
        out.ok("sidecar waiter served")
    finally:
        await conn.close()


async def sidecar_hold(url: str, seconds: float) -> None:
    conn = await asyncpg.connect(url, statement_cache_size=0)
    try:
        await conn.execute(f"select pg_sleep({seconds})")
    finally:
        await conn.close()


async def errors_by_class(out: Outcomes, name: str, run: Callable[[str], Awaitable[Any]]) -> None:
    for sql, expected in (("select 1/0", "22"), ("selec 1", "42"), ("select 'x'::int", "22")):
        try:
            await run(sql)
        except Exception as exc:
            out.ok(f"{name} error {expected}")
            del exc
        else:
            out.failed(f"{name} error {expected}:missing", RuntimeError(f"{sql!r} did not fail"))


async def session_features(out: Outcomes, url: str) -> None:
    """A client that pins a server connection (session SET, LISTEN) and sends introspection (routed)."""
    conn = await asyncpg.connect(url, statement_cache_size=0)
    try:
        await out.run("sidecar session set", lambda: conn.execute("set search_path to public"))
        await out.run("sidecar listen", lambda: conn.execute("listen poolkit_live"))
        # Held across several 1 s scrapes, so the pinned-clients gauge is seen.
        await asyncio.sleep(3.0)
        await out.run(
            "sidecar introspection",
            lambda: conn.fetch("select c.relname from pg_catalog.pg_class c where c.relkind = 'r' limit 5"),
        )
        await out.run("sidecar ddl", lambda: conn.execute("create table if not exists poolkit_live_ddl (id int)"))
        await out.run("sidecar unlisten", lambda: conn.execute("unlisten *"))
    finally:
        await conn.close()


async def prepared(out: Outcomes, url: str, stop: asyncio.Event) -> None:
    """asyncpg with its default statement cache (named prepared statements) through the sidecar."""
    pool = await asyncpg.create_pool(url, min_size=4, max_size=4)
    try:
        statements = ("select $1::int + 1", "select $1::text || 'x'", "select count(*) from pg_class where oid > $1")
        args = (1, "a", 0)
        i = 0
        while not stop.is_set():
            sql, arg = statements[i % 3], args[i % 3]
            await asyncio.gather(
                *(out.run("sidecar prepared", lambda s=sql, a=arg: pool.fetchval(s, a)) for _ in range(4))
            )
            i += 1
            await asyncio.sleep(0.05)
    finally:
        await pool.close()


async def churn_and_connect_errors(out: Outcomes, config: dict[str, str], dead: poolkit.Pool) -> None:
    """Connection churn (pools opened and closed, sidecar logins) and connect errors on both sides."""
    for _ in range(4):
        churn = await poolkit.create_pool(name="churn", min_size=1, max_size=1, idle_timeout=1)
        await out.run("churn query", lambda p=churn: p.fetchval("select 1"))
        await churn.close()

    async def login() -> None:
        conn = await asyncpg.connect(config["sidecar_url"], statement_cache_size=0)
        await conn.close()

    for _ in range(10):
        await out.run("sidecar login", login)
    # A library pool whose server refuses connections, and a sidecar whose upstream is down.
    for _ in range(3):
        await out.run("replica", lambda: dead.fetchval("select 1"))

    async def broken() -> None:
        conn = await asyncpg.connect(config["broken_sidecar_url"], statement_cache_size=0, timeout=10)
        await conn.close()

    for _ in range(3):
        await out.run("broken sidecar", broken)


async def workload(config: dict[str, str], pools: dict[str, Any]) -> Outcomes:
    out = Outcomes()
    orders, billing, reports = pools["orders"], pools["billing"], pools["reports"]
    sidecar = await asyncpg.create_pool(config["sidecar_url"], min_size=2, max_size=6, statement_cache_size=0)
    stop = asyncio.Event()
    background = [
        # Routed: plain statements stay pooled, catalog reads go to the direct URL.
        asyncio.create_task(steady(out, "orders", lambda: orders.routed("select 1").fetchval("select 1"), stop)),
        asyncio.create_task(steady(out, "introspection", lambda: orders.routed(CATALOG).fetch(CATALOG), stop)),
        asyncio.create_task(steady(out, "billing", lambda: billing.fetchval("select 1"), stop)),
        asyncio.create_task(steady(out, "reports", lambda: asyncio.to_thread(reports.fetchval, "select 1"), stop)),
        asyncio.create_task(steady(out, "sidecar", lambda: sidecar.fetchval("select 1"), stop)),
        asyncio.create_task(prepared(out, config["sidecar_url"], stop)),
    ]
    try:
        await asyncio.sleep(2.0)

        # Slow queries on a library pool and through the sidecar.
        slow = f"select pg_sleep({SLOW_SLEEP})"
        await asyncio.gather(
            *(out.run("orders slow", lambda: orders.execute(slow)) for _ in range(SLOW_COUNT)),
            *(out.run("billing slow", lambda: billing.execute(slow)) for _ in range(4)),
            *(out.run("reports slow", lambda: asyncio.to_thread(reports.execute, slow)) for _ in range(4)),
            *(out.run("sidecar slow", lambda: sidecar.execute(slow)) for _ in range(SLOW_COUNT)),
        )

        # Errors by SQLSTATE class.
        await errors_by_class(out, "orders", orders.execute)
        await errors_by_class(out, "billing", billing.execute)
        await errors_by_class(out, "reports", lambda sql: asyncio.to_thread(reports.execute, sql))
        await errors_by_class(out, "sidecar", sidecar.execute)

        # Exhaustion: every connection of `orders` (max_size 2) and of the sidecar (max_size 3) busy for HOLD
        # seconds; callers queue, the early ones give up (PoolTimeout / query_wait_timeout), a late one is
        # served after waiting.
        url = config["sidecar_url"]
        await asyncio.gather(
            hold(orders, HOLD),
            hold(orders, HOLD),
            waiter(out, "orders", orders, 0.3, ACQUIRE_TIMEOUT),
            waiter(out, "orders", orders, 1.5, ACQUIRE_TIMEOUT),
            waiter(out, "orders", orders, HOLD - 1.0, 3.0),
            sidecar_hold(url, HOLD),
            sidecar_hold(url, HOLD),
            sidecar_hold(url, HOLD),
            sidecar_waiter(out, url, 0.3),
            sidecar_waiter(out, url, 1.5),
        )
        # Session features (pins, routing) while the rest of the app churns connections and hits errors.
        await asyncio.gather(session_features(out, url), churn_and_connect_errors(out, config, pools["replica"]))
        await asyncio.sleep(2.0)
    finally:
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        await sidecar.close()
    return out


async def main() -> None:
    config = json.loads(os.environ["POOLKIT_LIVE"])
    # acquire_timeout is longer than HOLD: only the exhaustion phase's own waiters give up.
    common = {"slow_query_seconds": SLOW_SECONDS, "acquire_timeout": HOLD + 2, "idle_timeout": 60}
    # Every pool exists before the first scrape, so each series is scraped at zero before the workload moves
    # it (increase() and rate() need that first sample); `churn` and `replica` connect only in the workload.
    pools: dict[str, Any] = {
        "orders": await poolkit.create_pool(name="orders", driver="asyncpg", max_size=2, **common),
        "billing": await poolkit.create_pool(name="billing", driver="psycopg", max_size=2, min_size=1, **common),
        "reports": await asyncio.to_thread(poolkit.create_sync_pool, name="reports", max_size=2, **common),
        "churn": await poolkit.create_pool(name="churn", open=False),
        "replica": await poolkit.create_pool(
            name="replica", pooled_url=config["dead_url"], open=False, connect_timeout=1, acquire_timeout=1
        ),
    }
    server = poolkit.metrics.serve(0)
    print(json.dumps({"metrics_port": server.server_port}), flush=True)
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() == "go":
        began = time.monotonic()
        out = await workload(config, pools)
        result = {"counts": dict(out.counts), "messages": out.messages, "seconds": time.monotonic() - began}
        print(json.dumps({"result": result}), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    for name in ("orders", "billing", "churn", "replica"):
        await pools[name].close()
    await asyncio.to_thread(pools["reports"].close)
    server.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
