"""Load: 2,000 concurrent clients over 3 upstream connections through the sidecar for 60 s.

The sidecar runs as a child process; bench/soak.py drives the clients from four worker processes
(asyncpg, mostly idle: one operation every 2-5 s; reads, write transactions, slow queries, reconnects)
and samples the sidecar's RSS every second. Asserted: no client saw an error, all 2,000 were connected at
once, every committed write is in the database exactly once, p99 latency stays under a generous bound,
and the sidecar's RSS shows no growth trend (last third of the run against the middle third). The
figures are printed; the README quotes them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import psycopg
import pytest

from poolkit.dev.devstack import DevStack

from .child_sidecar import ChildSidecar
from .report import write_summary

REPO = Path(__file__).resolve().parents[2]
CLIENTS = 2000
SECONDS = 60.0


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("poolkit_bench_soak", REPO / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_2000_clients_over_3_connections_for_60s(stack: DevStack, request: pytest.FixtureRequest) -> None:
    soak = load_soak()
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        conn.execute(soak.SETUP_SQL)
    child = ChildSidecar(stack, max_size=3, query_wait_timeout=30)
    try:
        report = soak.drive(child.url(), child.pid, child.metrics_url, clients=CLIENTS, workers=4, seconds=SECONDS)
        alive = child.alive()
    finally:
        code = child.stop()
    lines = report.lines()
    write_summary(request, lines)

    assert alive and code == 0, child.output()[-3000:]
    assert report.errors == [], report.errors[:10]
    assert report.max_connected >= CLIENTS, report.max_connected
    # Mostly idle clients: one operation every 3.5 s on average, so about 570/s; half of that is plenty.
    assert report.ops >= CLIENTS / 3.5 * SECONDS / 2, report.ops
    assert report.p99 < 5.0  # generous: a loaded 2-core machine; the figure itself is printed
    first, middle, last = report.rss_thirds
    assert last <= middle * 1.10 + 8, f"sidecar RSS grew: thirds {first:.1f} / {middle:.1f} / {last:.1f} MiB"
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        row = conn.execute("SELECT (SELECT sum(v) FROM soak_accounts), (SELECT count(*) FROM soak_log)").fetchone()
    assert row == (report.writes, report.writes), (row, report.writes)  # every committed write, exactly once
    assert "Traceback" not in child.output()
