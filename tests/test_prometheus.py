"""A real Prometheus scrapes a poolkit process that ran a workload; PromQL over its API gets the numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from prom_harness import Prometheus, scrape

from poolkit.dev.devstack import DevStack
from poolkit.obs.metrics import COMMON_SQLSTATE_CLASSES

POOL = "prom-workload"
SLOW = 4

WORKLOAD = textwrap.dedent(
    f"""
    import asyncio, sys
    import poolkit, poolkit.metrics

    async def main():
        pool = await poolkit.create_pool(
            name={POOL!r}, max_size=2, slow_query_seconds=0.05, idle_timeout=300, pool_mode="transaction"
        )
        await asyncio.gather(*(pool.fetch("select pg_sleep($1)", 0.1) for _ in range({SLOW})))
        for _ in range(3):
            await pool.fetchval("select $1::int", 1)
        try:
            await pool.fetchval("select 1/0")
        except Exception:
            pass
        return pool

    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(main())  # kept open: its gauges stay in the scrape
    server = poolkit.metrics.serve(0)
    print(server.server_port, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    loop.run_until_complete(pool.close())
    """
)


@pytest.fixture
def workload(stack: DevStack) -> Iterator[str]:
    """A poolkit process that ran the workload and serves /metrics; yields its ``host:port``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOLKIT_", "PROMETHEUS_"))}
    env.update(stack.env())
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"the workload process failed:\n{err}")
    yield f"127.0.0.1:{port}"
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def test_prometheus_scrapes_the_workload_and_promql_returns_its_numbers(workload: str) -> None:
    # What the process exposes, read directly first: the numbers PromQL must then agree with.
    direct = scrape(f"http://{workload}/metrics")
    assert direct.value("poolkit_slow_queries_total", pool=POOL) == SLOW

    with Prometheus([workload]) as prom:
        prom.wait_for('up{job="poolkit"}', 1.0)
        prom.wait_for(f'sum(poolkit_slow_queries_total{{pool="{POOL}"}})', SLOW)
        assert prom.scalar(f'poolkit_query_errors_total{{pool="{POOL}",sqlstate_class="22"}}') == 1
        # Every pre-initialised SQLSTATE class is a series Prometheus stores (0 until it happens).
        assert prom.scalar(f'count(poolkit_query_errors_total{{pool="{POOL}"}})') == len(COMMON_SQLSTATE_CLASSES)
        assert prom.scalar(f'poolkit_pool_max_connections{{pool="{POOL}"}}') == 2
        assert prom.scalar(f'poolkit_pool_waiting_requests{{pool="{POOL}"}}') == 0
        assert prom.scalar(f'sum(poolkit_pool_connections{{pool="{POOL}"}})') == 2
        # SLOW sleeps, 3 quick selects, 1 error (psycopg's empty check queries are not counted).
        assert prom.scalar(f'sum(poolkit_query_duration_seconds_count{{pool="{POOL}"}})') == SLOW + 4
        assert prom.scalar(f'sum(poolkit_query_duration_seconds_bucket{{pool="{POOL}",le="0.05"}})') == 4
        [series] = prom.query(f'poolkit_slow_queries_total{{pool="{POOL}"}}')
        assert series["metric"]["driver"] == "asyncpg"
        assert series["metric"]["route"] == "pooled"
        assert series["metric"]["job"] == "poolkit"
