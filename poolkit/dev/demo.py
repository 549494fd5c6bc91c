"""``poolkit demo``: start the local stack, run a concurrent workload through poolkit pools, report."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from poolkit.core.settings import DIRECT_URL_ENV, POOLED_URL_ENV, load_settings
from poolkit.dev.devstack import DevStack
from poolkit.pool.async_pool import Pool


async def _workload(pool: Pool, queries: int, tasks: int) -> tuple[int, int, float]:
    ph = pool.adapter.sql("$1")
    per_task = max(1, queries // tasks)
    errors = 0

    async def worker(n: int) -> None:
        nonlocal errors
        for i in range(per_task):
            try:
                if i % 3 == 0:
                    await pool.execute(f"INSERT INTO poolkit_demo (k) VALUES ({ph})", n)  # noqa: S608 - ph is $1 or %s
                else:
                    await pool.fetchval(f"SELECT count(*) FROM poolkit_demo WHERE k = {ph}", n)  # noqa: S608
            except Exception:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(tasks)))
    return per_task * tasks, errors, time.perf_counter() - started


async def _demo(queries: int, tasks: int) -> int:
    settings = load_settings(max_size=3, name="demo")
    print(f"pooled URL: {settings.pooled_dsn().redacted()}")
    failures = 0
    for driver in ("asyncpg", "psycopg"):
        pool = Pool(load_settings(max_size=3, name=f"demo-{driver}", driver=driver))
        print(
            f"\n[{driver}] detected {pool.mode.value} ({pool.detection.reason}); "
            f"prepared statements {'off' if pool.mode.value == 'transaction' else 'on'}"
        )
        try:
            await pool.direct().execute("CREATE TABLE IF NOT EXISTS poolkit_demo (id bigserial PRIMARY KEY, k int)")
            done, errors, seconds = await _workload(pool, queries, tasks)
            failures += errors
            print(
                f"[{driver}] {done} statements from {tasks} concurrent tasks in {seconds:.2f}s "
                f"({done / seconds:,.0f}/s), {errors} errors"
            )
            print(f"[{driver}] {pool!r}")
        finally:
            await pool.close()
    failures += await _through_sidecar(queries, tasks)
    return 1 if failures else 0


async def _through_sidecar(queries: int, tasks: int) -> int:
    """App workload -> sidecar (in this process) -> PostgreSQL: the sidecar does the pooling."""
    from poolkit.sidecar.policy.config import load_sidecar_settings  # noqa: PLC0415
    from poolkit.sidecar.service.app import Sidecar  # noqa: PLC0415 - the library part of the demo does not need it

    base = load_settings()
    direct = base.direct_dsn() or base.pooled_dsn()
    sidecar = Sidecar(
        load_sidecar_settings(
            None,
            direct_url=direct.to_url(),
            upstream="direct",
            listen_port=0,
            http_port=0,
            max_size=3,
            auth_type="trust",
        )
    )
    await sidecar.start()
    try:
        url = f"postgresql://{direct.user}@127.0.0.1:{sidecar.port}/{direct.database}?sslmode=disable"
        # max_size=3 here is the app's pool; the sidecar multiplexes every app instance over its own 3.
        pool = Pool(load_settings(pooled_url=url, pool_mode="transaction", max_size=3, name="demo-sidecar"))
        try:
            done, errors, seconds = await _workload(pool, queries, tasks)
        finally:
            await pool.close()
        print(
            f"\n[sidecar] {done} statements from {tasks} tasks through the sidecar on 127.0.0.1:{sidecar.port} "
            f"in {seconds:.2f}s ({done / seconds:,.0f}/s), {errors} errors"
        )
        print(
            f"[sidecar] metrics: http://127.0.0.1:{sidecar.http_port}/metrics (this demo's sidecar stops now; "
            "run your own with `poolkit sidecar`)"
        )
        return errors
    finally:
        await sidecar.shutdown(5.0)
        await sidecar.close()


def run_demo(*, queries: int = 1000, tasks: int = 20) -> int:
    """Use the configured database if there is one, else start the local stack for the demo's duration."""
    configured = any(os.environ.get(n) for n in (*POOLED_URL_ENV, *DIRECT_URL_ENV))
    if configured:
        return asyncio.run(_demo(queries, tasks))
    print("no database configured: starting the local stack (PostgreSQL with TLS + PgBouncer in transaction mode)")
    with DevStack() as stack:
        saved: dict[str, Any] = {k: os.environ.get(k) for k in stack.env()}
        os.environ.update(stack.env())
        try:
            return asyncio.run(_demo(queries, tasks))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
