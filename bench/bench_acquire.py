"""Benchmark: the CPU cost of ``async with pool.acquire()`` itself (no statement, no round trip), per driver.

    .venv/bin/python bench/bench_acquire.py [--iterations 20000] [--runs 5] [--baseline /path/to/checkout]

The pool is in transaction mode (asyncpg's release then sends no reset; psycopg's has nothing to commit), so an
acquire/release pair never waits for the network: what is timed is poolkit's wrapper plus the driver pool's own
bookkeeping, the part of every query's cost this project controls. One task on a pool of 1 (no waiting), and 4
tasks on a pool of 1 (every acquisition waits: the deadline queue's path). Each run is a fresh
process; the best of ``--runs`` is shown (the least disturbed by other processes). With ``--baseline`` each run
alternates with one of another checkout's poolkit (put first on ``PYTHONPATH``). Starts a local DevStack unless
POOLKIT_DIRECT_URL is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from poolkit.dev.devstack import DevStack

_CHILD = """
import asyncio, json, os, sys, time
import poolkit

async def main(driver, iterations, tasks):
    pool = await poolkit.create_pool(
        driver=driver, name="bench-acquire", pooled_url=os.environ["POOLKIT_DIRECT_URL"], pool_mode="transaction",
        max_size=1, min_size=1, profile="server", acquire_timeout=60,
    )
    per_task = iterations // tasks

    async def loop():
        for _ in range(per_task):
            async with pool.acquire():
                pass

    await loop()  # warm up
    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(tasks)))
    elapsed = time.perf_counter() - t0
    await pool.close()
    return elapsed / (per_task * tasks) * 1e6

print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))))
"""


def run(driver: str, iterations: int, tasks: int, pythonpath: str | None) -> float:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, driver, str(iterations), str(tasks)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env=env,
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def main(args: argparse.Namespace) -> None:
    stack: DevStack | None = None
    if not os.environ.get("POOLKIT_DIRECT_URL"):
        stack = DevStack().start()
        os.environ.update(stack.env())
    try:
        for tasks in (1, 4):
            for driver in ("asyncpg", "psycopg"):
                ours: list[float] = []
                theirs: list[float] = []
                for _ in range(args.runs):
                    ours.append(run(driver, args.iterations, tasks, None))
                    if args.baseline:
                        theirs.append(run(driver, args.iterations, tasks, args.baseline))
                label = f"{driver}, {tasks} task{'s' if tasks > 1 else ''} on 1 connection"
                line = f"{label:<32} {min(ours):6.1f} µs per acquire+release (best of {args.runs})"
                if theirs:
                    line += f"   baseline {min(theirs):6.1f} µs"
                print(line, flush=True)
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="another checkout to compare with, run alternately")
    main(parser.parse_args())
