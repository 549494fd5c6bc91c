"""RLS-scoped sessions (``pool.as_user``) through the sidecar: claims apply inside, nothing survives outside."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from test_rls import ALICE, BOB, PROBE, SETUP, claims  # type: ignore[import-not-found]

from poolkit import create_pool
from poolkit.dev.devstack import DevStack

from .conftest import SidecarThread


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_as_user_through_the_sidecar_leaves_nothing_behind(
    stack: DevStack, sidecar_factory: Callable[..., SidecarThread], driver: str
) -> None:
    stack.psql(SETUP)
    # One upstream connection: every client below provably shares the same server backend.
    sidecar = sidecar_factory(max_size=1)
    url = sidecar.url()
    pool = await create_pool(driver=driver, pooled_url=url, pool_mode="transaction", name=f"rls-sidecar-{driver}")
    try:
        async with pool.as_user(claims(ALICE)) as conn:
            q = "SELECT body FROM rls_demo.notes ORDER BY body"
            rows: list[Any] = await conn.fetch(q) if driver == "asyncpg" else await (await conn.execute(q)).fetchall()
            assert [r[0] for r in rows] == ["alice 1", "alice 2"]
            q = "SELECT pg_backend_pid()"
            inside_pid = (
                await conn.fetchval(q) if driver == "asyncpg" else (await (await conn.execute(q)).fetchone())[0]
            )
        async with pool.as_user(claims(BOB)) as conn:
            q = "SELECT body FROM rls_demo.notes ORDER BY body"
            rows = await conn.fetch(q) if driver == "asyncpg" else await (await conn.execute(q)).fetchall()
            assert [r[0] for r in rows] == ["bob 1"]
    finally:
        await pool.close()

    # The next client of the sidecar gets the same server backend, as the login role, with no claims.
    with psycopg.connect(url, autocommit=True) as other:
        pid, user, claims_json, sub = other.execute(PROBE).fetchone()  # type: ignore[misc]
    assert pid == inside_pid
    assert user == "app"
    assert not claims_json and not sub

    # Without the helper, a session-level set_config pins its client to the server, which is reset
    # before the next client gets it (the same through PgBouncer leaks: tests/sidecar/test_isolation.py).
    with psycopg.connect(url, autocommit=True) as leaky:
        leaky.execute("SELECT set_config('request.jwt.claim.sub', %s, false)", (BOB,))
        leaky_pid = leaky.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    with psycopg.connect(url, autocommit=True) as victim:
        pid, _, _, sub = victim.execute(PROBE).fetchone()  # type: ignore[misc]
    assert pid == leaky_pid
    assert not sub
