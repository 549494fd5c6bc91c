"""Benchmark: the cold start of a serverless function: ``import poolkit``, ``create_pool``, the first query.

    .venv/bin/python bench/bench_coldstart.py [--runs 9] [--baseline /path/to/another/checkout]

Each measurement runs in a fresh interpreter (what a cold serverless instance pays): the wall time of
``import poolkit`` alone, and of ``import poolkit`` + ``create_pool()`` + the first ``fetchval`` through the
transaction pooler, for each driver; the median over ``--runs`` processes is printed, with the driver and
metrics modules that ``import poolkit`` loaded. Starts a local DevStack (PostgreSQL + PgBouncer) unless
POOLKIT_POOLED_URL and POOLKIT_DIRECT_URL are set.

With ``--baseline`` every measurement alternates between this checkout and the baseline's poolkit (put first on
``PYTHONPATH``), so both see the same machine load; each line then shows both medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from poolkit.dev.devstack import DevStack

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


def child(code: str, *args: str, pythonpath: str | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    # Not from the repository: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH, and
    # the baseline would silently be this checkout again.
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs) * 1000)


def measure(
    code: str, argv: list[str], runs: int, baseline: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``runs`` fresh processes of this checkout (and of the baseline, alternating with them)."""
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for _ in range(runs):
        ours.append(child(code, *argv))
        if baseline is not None:
            theirs.append(child(code, *argv, pythonpath=baseline))
    return ours, theirs


def line(runs: list[dict[str, Any]]) -> str:
    return (
        f"import {median_of(runs, 'import'):4.0f} ms  create_pool {median_of(runs, 'create'):3.0f} ms"
        f"  first query {median_of(runs, 'first_query'):4.0f} ms  total {median_of(runs, 'total'):4.0f} ms"
    )


def main(args: argparse.Namespace) -> None:
    stack: DevStack | None = None
    if not (os.environ.get("POOLKIT_POOLED_URL") and os.environ.get("POOLKIT_DIRECT_URL")):
        stack = DevStack().start()
        os.environ.update(stack.env())
    try:
        ours, theirs = measure(_IMPORT_ONLY, [], args.runs, args.baseline)
        for label, runs in (("this checkout", ours), ("baseline", theirs)):
            if runs:
                print(
                    f"{label:<13} import poolkit: {median_of(runs, 'import'):.0f} ms (median of {args.runs}); "
                    f"loaded: {runs[-1]['loaded']}",
                    flush=True,
                )
        for label, code, argv in (
            ("asyncpg", _FIRST_QUERY, ["asyncpg"]),
            ("psycopg", _FIRST_QUERY, ["psycopg"]),
            ("psycopg sync", _FIRST_QUERY_SYNC, []),
        ):
            ours, theirs = measure(code, argv, args.runs, args.baseline)
            print(f"{label:<13} {line(ours)}", flush=True)
            if theirs:
                print(f"{'  baseline':<13} {line(theirs)}", flush=True)
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="fresh processes per measurement (median shown)")
    parser.add_argument("--baseline", default=None, help="another checkout to compare with, measured alternately")
    main(parser.parse_args())
