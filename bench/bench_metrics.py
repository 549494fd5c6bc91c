"""Benchmark: queries/s of a poolkit pool (metrics on) vs the raw driver pool, same size and workload.

    .venv/bin/python bench/bench_metrics.py [--seconds 10] [--tasks 10] [--size 3]

Starts a local DevStack (PostgreSQL + PgBouncer) unless POOLKIT_DIRECT_URL / POOLKIT_POOLED_URL are set.
Each case (driver x route) alternates short rounds of the raw pool and the poolkit pool so both see the
same machine load, then prints queries/s and the ratio poolkit / raw (goal >= 0.97), plus the median of the
per-round ratios (each round runs both sides back to back, so bursts of load from other processes on a shared
machine cancel out better than in the totals) and the client process's CPU time per query of each side (what the
wrapper itself costs, less sensitive to other processes than queries/s).

Routes: ``direct`` (prepared statements on: asyncpg's statement cache, psycopg's prepare_threshold) and
``pgbouncer`` (transaction mode: statement cache off, as poolkit configures it). Workload: ``--tasks``
tasks, each looping ``acquire; SELECT $1::int; release``. For psycopg a third column runs the raw pool with
``check=AsyncConnectionPool.check_connection``, which poolkit's psycopg pools use on every checkout, to
separate that round trip from the cost of the metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from psycopg_pool import AsyncConnectionPool

import poolkit
from poolkit.core import detect
from poolkit.core.detect import Mode
from poolkit.dev.devstack import DevStack

Query = Callable[[int], Awaitable[Any]]


async def run_for(seconds: float, tasks: int, one: Query) -> int:
    """Run ``tasks`` loops of ``one`` for ``seconds``; the number of queries completed."""
    done = 0
    stop = time.perf_counter() + seconds

    async def loop(seed: int) -> None:
        nonlocal done
        i = seed
        while time.perf_counter() < stop:
            await one(i)
            i += 1
            done += 1

    await asyncio.gather(*(loop(k * 1_000_000) for k in range(tasks)))
    return done


# ------------------------------------------------------------------------------------------- pools


async def raw_asyncpg(url: str, size: int, mode: Mode) -> tuple[Query, Callable[[], Awaitable[None]]]:
    pool = await asyncpg.create_pool(url, min_size=size, max_size=size, **detect.asyncpg_statement_options(mode))

    async def one(i: int) -> Any:
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT $1::int", i)

    return one, pool.close


async def raw_psycopg(url: str, size: int, mode: Mode, *, check: bool) -> tuple[Query, Callable[[], Awaitable[None]]]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url,
        min_size=size,
        max_size=size,
        open=False,
        kwargs=detect.psycopg_statement_options(mode),
        check=AsyncConnectionPool.check_connection if check else None,
    )
    await pool.open(wait=True)

    async def one(i: int) -> Any:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT %s::int", (i,))
            return await cur.fetchone()

    return one, pool.close


async def poolkit_pool(driver: str, url: str, size: int, mode: Mode) -> tuple[Query, Callable[[], Awaitable[None]]]:
    pool = await poolkit.create_pool(
        driver=driver,
        name=f"bench-{driver}-{mode.value}",
        pooled_url=url,
        pool_mode="transaction" if mode is Mode.TRANSACTION else "direct",
        max_size=size,
        min_size=size,
        profile="server",
    )
    if driver == "asyncpg":

        async def one(i: int) -> Any:
            async with pool.acquire() as conn:
                return await conn.fetchval("SELECT $1::int", i)

    else:

        async def one(i: int) -> Any:
            async with pool.acquire() as conn:
                cur = await conn.execute("SELECT %s::int", (i,))
                return await cur.fetchone()

    return one, pool.close


# ------------------------------------------------------------------------------------------- cases


async def case(
    label: str,
    contenders: dict[str, Callable[[], Awaitable[tuple[Query, Callable[[], Awaitable[None]]]]]],
    seconds: float,
    tasks: int,
    rounds: int,
) -> dict[str, float]:
    opened = {name: await make() for name, make in contenders.items()}
    try:
        for one, _ in opened.values():  # warm up: connections, statement caches, type codecs
            await run_for(0.3, tasks, one)
        counts = dict.fromkeys(opened, 0)
        cpu = dict.fromkeys(opened, 0.0)
        per_round = seconds / rounds / len(opened)
        paired: list[float] = []  # poolkit / raw within one round: both sides saw nearly the same load
        for r in range(rounds):
            order = list(opened) if r % 2 == 0 else list(reversed(opened))  # no side always goes first
            done = {}
            for name in order:
                c0 = time.process_time()
                done[name] = await run_for(per_round, tasks, opened[name][0])
                cpu[name] += time.process_time() - c0
                counts[name] += done[name]
            paired.append(done["poolkit"] / max(done["raw"], 1))
        qps = {name: n / (per_round * rounds) for name, n in counts.items()}
    finally:
        for _, close in opened.values():
            with contextlib.suppress(Exception):
                await close()
    cols = "  ".join(f"{name} {q:8.0f} q/s" for name, q in qps.items())
    paired.sort()
    spread = f"{paired[len(paired) // 4]:.2f}-{paired[(3 * len(paired)) // 4]:.2f}"
    us = {name: cpu[name] / max(counts[name], 1) * 1e6 for name in opened}
    print(
        f"{label:<22} {cols}  ratio poolkit/raw {qps['poolkit'] / qps['raw']:.3f}"
        f"  (per-round median {statistics.median(paired):.3f}, middle half {spread})"
        f"  client CPU µs/query raw {us['raw']:.0f} poolkit {us['poolkit']:.0f}",
        flush=True,
    )
    return qps


async def main(args: argparse.Namespace) -> None:
    stack: DevStack | None = None
    direct_url = os.environ.get("POOLKIT_DIRECT_URL")
    pooled_url = os.environ.get("POOLKIT_POOLED_URL")
    if not (direct_url and pooled_url):
        stack = DevStack().start()
        os.environ.update(stack.env())
        direct_url, pooled_url = stack.direct_url, stack.pooled_url
    try:
        print(
            f"{args.tasks} tasks, pool size {args.size}, ~{args.seconds:g} s per case, SELECT $1::int",
            flush=True,
        )
        size, tasks, secs, rounds = args.size, args.tasks, args.seconds, args.rounds
        wanted = set(args.cases.split(",")) if args.cases else None
        for route, url, mode in (
            ("direct", direct_url, Mode.DIRECT),
            ("pgbouncer", pooled_url, Mode.TRANSACTION),
        ):
            if wanted is None or f"asyncpg-{route}" in wanted:
                await case(
                    f"asyncpg {route}",
                    {
                        "raw": lambda url=url, mode=mode: raw_asyncpg(url, size, mode),
                        "poolkit": lambda url=url, mode=mode: poolkit_pool("asyncpg", url, size, mode),
                    },
                    secs,
                    tasks,
                    rounds,
                )
            if wanted is None or f"psycopg-{route}" in wanted:
                await case(
                    f"psycopg {route}",
                    {
                        "raw": lambda url=url, mode=mode: raw_psycopg(url, size, mode, check=False),
                        "raw+check": lambda url=url, mode=mode: raw_psycopg(url, size, mode, check=True),
                        "poolkit": lambda url=url, mode=mode: poolkit_pool("psycopg", url, size, mode),
                    },
                    secs,
                    tasks,
                    rounds,
                )
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per case (all sides)")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--size", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per case")
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated subset of asyncpg-direct,psycopg-direct,asyncpg-pgbouncer,psycopg-pgbouncer",
    )
    asyncio.run(main(parser.parse_args()))
