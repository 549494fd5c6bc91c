"""Benchmark: the cold start of a serverless function: ``import poolkit``, ``create_pool``, the first query.

    .venv/bin/python bench/bench_coldstart.py [--runs 9]

Each measurement runs in a fresh interpreter (what a cold serverless instance pays): the wall time of
``import poolkit`` alone, and of ``import poolkit`` + ``create_pool()`` + the first ``fetchval`` through the
transaction pooler, for each driver; the median over ``--runs`` processes is printed, with the driver and
metrics modules that ``import poolkit`` loaded. Starts a local DevStack (PostgreSQL + PgBouncer) unless
POOLKIT_POOLED_URL and POOLKIT_DIRECT_URL are set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from poolkit.devstack import DevStack

# Run in the child; prints one JSON line. perf_counter starts after the interpreter itself is up.
_IMPORT_ONLY = """
import json, sys, time
t0 = time.perf_counter()
import poolkit
t1 = time.perf_counter()
heavy = sorted(m for m in ("asyncpg", "psycopg", "psycopg_pool", "prometheus_client", "pydantic") if m in sys.modules)
print(json.dumps({"import": t1 - t0, "loaded": heavy}))
"""

_FIRST_QUERY = """
import asyncio, json, sys, time
t0 = time.perf_counter()
import poolkit
t1 = time.perf_counter()

async def main():
    pool = await poolkit.create_pool(driver=sys.argv[1], open=False)
    t2 = time.perf_counter()
    value = await pool.fetchval("SELECT 1")
    t3 = time.perf_counter()
    assert value == 1
    await pool.close()
    return t2, t3

t2, t3 = asyncio.run(main())
print(json.dumps({"import": t1 - t0, "create": t2 - t1, "first_query": t3 - t2, "total": t3 - t0}))
"""

_FIRST_QUERY_SYNC = """
import json, time
t0 = time.perf_counter()
import poolkit
t1 = time.perf_counter()
pool = poolkit.create_sync_pool(open=False)
t2 = time.perf_counter()
value = pool.fetchval("SELECT 1")
t3 = time.perf_counter()
assert value == 1
pool.close()
print(json.dumps({"import": t1 - t0, "create": t2 - t1, "first_query": t3 - t2, "total": t3 - t0}))
"""


def child(code: str, *args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, timeout=60, env=os.environ
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs) * 1000


def main(args: argparse.Namespace) -> None:
    stack: DevStack | None = None
    if not (os.environ.get("POOLKIT_POOLED_URL") and os.environ.get("POOLKIT_DIRECT_URL")):
        stack = DevStack().start()
        os.environ.update(stack.env())
    try:
        imports = [child(_IMPORT_ONLY) for _ in range(args.runs)]
        loaded = imports[-1]["loaded"]
        print(f"import poolkit: {median_of(imports, 'import'):.0f} ms (median of {args.runs}); loaded: {loaded}")
        for label, code, argv in (
            ("asyncpg", _FIRST_QUERY, ["asyncpg"]),
            ("psycopg", _FIRST_QUERY, ["psycopg"]),
            ("psycopg sync", _FIRST_QUERY_SYNC, []),
        ):
            runs = [child(code, *argv) for _ in range(args.runs)]
            print(
                f"{label:<13} import {median_of(runs, 'import'):4.0f} ms  create_pool {median_of(runs, 'create'):3.0f}"
                f" ms  first query {median_of(runs, 'first_query'):4.0f} ms  total {median_of(runs, 'total'):4.0f} ms",
                flush=True,
            )
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="fresh processes per measurement (median shown)")
    main(parser.parse_args())
