"""Session state never passes from one borrower of a library pool to the next.

Six kinds of state: plain ``SET``, ``SET ROLE``, ``set_config(..., false)``, a temporary table, a session
advisory lock and a statement prepared with SQL ``PREPARE``; for asyncpg, psycopg (async) and psycopg's
sync pool. Each test shows the leak without the protection, on the same backend (``pg_backend_pid()``).

* Direct route (full sessions): poolkit resets a connection on release. asyncpg's own reset (RESET ALL and
  friends) keeps the role, temp tables and SQL prepared statements, and psycopg_pool resets nothing; after
  a statement that leaves session state, poolkit adds the rest (asyncpg) or runs DISCARD ALL (psycopg).
* Pooled route (a transaction pooler): state set on a server connection reaches whichever client gets that
  server next, and a reset on release cannot help (the next statement may already be on another server).
  poolkit refuses the statement with SessionStateError before it is sent; the raw driver leaks it. A
  PgBouncer with a single server connection makes "the next client" land on the same backend every time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

import poolkit
from poolkit.dev.devstack import DevStack, PgBouncerHandle
from poolkit.errors import SessionStateError

DRIVERS = ("asyncpg", "psycopg", "psycopg-sync")
LOCK_KEY = 424242

# One probe for every kind, run by the next borrower: which backend it is on, and what it can see.
PROBE = f"""
SELECT pg_backend_pid(),
       current_setting('work_mem'),
       current_user::text,
       coalesce(current_setting('poolkit_iso.claims', true), ''),
       to_regclass('poolkit_iso_tmp') IS NOT NULL,
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = {LOCK_KEY}
           AND pid = pg_backend_pid())::int,
       (SELECT count(*) FROM pg_prepared_statements WHERE name = 'poolkit_iso_stmt')::int
"""


@dataclass(frozen=True)
class Seen:
    pid: int
    work_mem: str
    user: str
    claims: str
    temp_table: bool
    locks: int
    prepared: int


@dataclass(frozen=True)
class Kind:
    name: str
    sql: str  # {role} is the role the app may SET ROLE to

    def leaked(self, seen: Seen, role: str) -> bool:
        return {
            "set": seen.work_mem == "7777kB",
            "set_role": seen.user == role,
            "set_config": seen.claims == "leaked",
            "temp_table": seen.temp_table,
            "advisory_lock": seen.locks > 0,
            "prepare": seen.prepared > 0,
        }[self.name]


KINDS = (
    Kind("set", "SET work_mem = '7777kB'"),
    Kind("set_role", "SET ROLE {role}"),
    Kind("set_config", "SELECT set_config('poolkit_iso.claims', 'leaked', false)"),
    Kind("temp_table", "CREATE TEMP TABLE poolkit_iso_tmp (id int)"),
    Kind("advisory_lock", f"SELECT pg_advisory_lock({LOCK_KEY})"),
    Kind("prepare", "PREPARE poolkit_iso_stmt AS SELECT 1"),
)
# What asyncpg's own reset (advisory unlocks, CLOSE ALL, UNLISTEN *, RESET ALL) leaves behind.
ASYNCPG_DEFAULT_RESET_LEAKS = {"set_role", "temp_table", "prepare"}


@pytest.fixture(scope="module")
def role(stack: DevStack) -> Iterator[str]:
    """A role the app user may SET ROLE to (and nothing else)."""
    name = f"poolkit_iso_{uuid.uuid4().hex[:8]}"
    stack.psql(f"CREATE ROLE {name} NOLOGIN; GRANT {name} TO app;")
    yield name
    stack.psql(f"REVOKE {name} FROM app; DROP ROLE {name};")


@pytest.fixture(scope="module")
def one_server(stack: DevStack) -> Iterator[PgBouncerHandle]:
    """A transaction-mode PgBouncer with one server connection: every client shares one backend."""
    bouncer = stack.start_pgbouncer(pool_size=1)
    yield bouncer
    bouncer.stop()


class Borrower:
    """acquire / run / release on any of the pools under test, with the same coroutine API."""

    def __init__(self, driver: str, pool: Any, *, kit: bool) -> None:
        self.driver = driver
        self.pool = pool
        self.kit = kit

    def _async_checkout(self) -> Any:
        if self.kit or self.driver == "asyncpg":
            return self.pool.acquire()
        return self.pool.connection()

    async def run(self, sql: str, during: Callable[[], Awaitable[Any]] | None = None) -> int:
        """One checkout: ``sql``, then the backend pid; ``during()`` runs before the connection goes back."""
        if self.driver == "psycopg-sync":
            loop = asyncio.get_running_loop()

            def call_during() -> None:
                if during is not None:
                    asyncio.run_coroutine_threadsafe(during(), loop).result()

            return await asyncio.to_thread(self._run_sync, sql, call_during)
        async with self._async_checkout() as conn:
            if self.driver == "asyncpg":
                await conn.execute(sql)
                pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            else:
                await conn.execute(sql)
                pid = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone())[0]
            if during is not None:
                await during()
            return pid

    def _run_sync(self, sql: str, during: Callable[[], None]) -> int:
        with self.pool.acquire() if self.kit else self.pool.connection() as conn:
            conn.execute(sql)
            pid: int = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            during()
            return pid

    async def probe(self) -> Seen:
        if self.driver == "psycopg-sync":
            return await asyncio.to_thread(self._probe_sync)
        async with self._async_checkout() as conn:
            if self.driver == "asyncpg":
                return Seen(*(await conn.fetchrow(PROBE)))
            return Seen(*(await (await conn.execute(PROBE)).fetchone()))

    def _probe_sync(self) -> Seen:
        with self.pool.acquire() if self.kit else self.pool.connection() as conn:
            return Seen(*conn.execute(PROBE).fetchone())

    async def close(self) -> None:
        if self.driver == "psycopg-sync":
            await asyncio.to_thread(self.pool.close)
        else:
            await self.pool.close()


# autocommit: every statement stands alone, as through asyncpg (and DISCARD ALL may run for the clean-up).
PSYCOPG_RAW: dict[str, Any] = {"prepare_threshold": None, "autocommit": True}


async def _no_reset(conn: Any) -> None:
    # asyncpg without a release reset: what poolkit configures for a transaction pooler.
    return None


async def raw_pool(driver: str, url: str, *, pooler: bool, asyncpg_reset: bool = True) -> Borrower:
    """The driver's own pool, one connection, its defaults (statement caching off through the pooler)."""
    if driver == "asyncpg":
        extra: dict[str, Any] = {} if asyncpg_reset else {"reset": _no_reset}
        pool: Any = await asyncpg.create_pool(
            url, min_size=1, max_size=1, statement_cache_size=0 if pooler else 100, **extra
        )
    elif driver == "psycopg":
        pool = AsyncConnectionPool(url, min_size=1, max_size=1, open=False, kwargs=PSYCOPG_RAW)
        await pool.open(wait=True)
    else:
        pool = ConnectionPool(url, min_size=1, max_size=1, open=False, kwargs=PSYCOPG_RAW)
        await asyncio.to_thread(pool.open, wait=True)
    return Borrower(driver, pool, kit=False)


async def kit_pool(driver: str, url: str, ca_file: str, *, pooler: bool) -> Borrower:
    settings = {
        "name": f"iso-{uuid.uuid4().hex[:8]}",
        "pooled_url": url,
        "pool_mode": "transaction" if pooler else "direct",
        "sslrootcert": ca_file,
        "max_size": 1,
        "profile": "server",
    }
    if driver == "psycopg-sync":
        pool: Any = await asyncio.to_thread(poolkit.create_sync_pool, **settings)
    else:
        pool = await poolkit.create_pool(driver=driver, **settings)
    return Borrower(driver, pool, kit=True)


def _sql(kind: Kind, role: str) -> str:
    return kind.sql.format(role=role)


# --------------------------------------------------------------------------------------------- direct


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_direct_route_resets_session_state_between_borrowers(
    driver: str, kind: Kind, stack: DevStack, role: str
) -> None:
    url = stack.direct_url
    sql = _sql(kind, role)

    kit = await kit_pool(driver, url, str(stack.ca_file), pooler=False)
    try:
        pid = await kit.run(sql)
        seen = await kit.probe()
        assert seen.pid == pid  # the next borrower got the same backend ...
        assert not kind.leaked(seen, role), seen  # ... without the state
        assert seen.user == "app"
        assert (await kit.probe()).pid == pid  # a clean checkout keeps the connection as it is
    finally:
        await kit.close()

    # Without the protection: the driver's pool with no reset on release (psycopg_pool's default; asyncpg
    # with `reset` switched off, as for a transaction pooler). Each pool is closed before the next one
    # starts: a leaked advisory lock would block the next pool's backend.
    bare = await raw_pool(driver, url, pooler=False, asyncpg_reset=False)
    try:
        bare_pid = await bare.run(sql)
        bare_seen = await bare.probe()
        assert bare_seen.pid == bare_pid
        assert kind.leaked(bare_seen, role), bare_seen  # the leak poolkit prevents
    finally:
        await bare.close()

    if driver == "asyncpg":  # asyncpg's own reset: some kinds survive it
        default = await raw_pool(driver, url, pooler=False)
        try:
            default_pid = await default.run(sql)
            default_seen = await default.probe()
            assert default_seen.pid == default_pid
            assert kind.leaked(default_seen, role) == (kind.name in ASYNCPG_DEFAULT_RESET_LEAKS), default_seen
        finally:
            await default.close()


# --------------------------------------------------------------------------------------------- pooled


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_pooled_route_refuses_session_state_the_raw_driver_leaks(
    driver: str, kind: Kind, stack: DevStack, one_server: PgBouncerHandle, role: str
) -> None:
    url = one_server.url()
    sql = _sql(kind, role)
    kit = await kit_pool(driver, url, str(stack.ca_file), pooler=True)
    raw = await raw_pool(driver, url, pooler=True)
    other = await raw_pool(driver, url, pooler=True)  # another client of the same PgBouncer
    try:
        with pytest.raises(SessionStateError) as refused:
            await kit.run(sql)
        assert refused.value.reason == {"set": "session_set", "set_config": "session_set"}.get(kind.name, kind.name)
        assert "pool.direct()" in str(refused.value)
        seen = await other.probe()
        assert not kind.leaked(seen, role), seen  # nothing reached the shared server
        assert (await kit.probe()).pid == seen.pid  # and the pool still works, on that same server

        # Without the protection: the raw driver sets it, and another client of the pooler inherits it at
        # once (asyncpg's reset on release comes too late, and through a pooler may not reach that server).
        probes: list[Seen] = []

        async def probe_from_other_client() -> None:
            probes.append(await other.probe())

        raw_pid = await raw.run(sql, during=probe_from_other_client)
        (leaked,) = probes
        assert leaked.pid == raw_pid
        assert kind.leaked(leaked, role), leaked
    finally:
        # Leave nothing on the shared server connection for the next test.
        await other.run("DISCARD ALL")
        for borrower in (kit, raw, other):
            await borrower.close()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_pooled_route_accepts_transaction_local_forms(
    driver: str, stack: DevStack, one_server: PgBouncerHandle
) -> None:
    """What the refusal points to works through the pooler, and leaves nothing behind."""
    kit = await kit_pool(driver, one_server.url(), str(stack.ca_file), pooler=True)
    other = await raw_pool(driver, one_server.url(), pooler=True)
    statements = [
        "SET LOCAL work_mem = '7777kB'",
        "SELECT set_config('poolkit_iso.claims', 'leaked', true)",
        f"SELECT pg_advisory_xact_lock({LOCK_KEY})",
        "CREATE TEMP TABLE poolkit_iso_tmp (id int) ON COMMIT DROP",
        "RESET ALL",
        "DEALLOCATE ALL",
        "SELECT pg_advisory_unlock_all()",
    ]
    try:
        if driver == "asyncpg":
            async with kit.pool.acquire() as conn, conn.transaction():
                for sql in statements[:4]:
                    await conn.execute(sql)
                assert await conn.fetchval("SELECT current_setting('work_mem')") == "7777kB"
        elif driver == "psycopg":
            async with kit.pool.acquire() as conn:
                for sql in statements[:4]:
                    await conn.execute(sql)
        else:

            def run() -> None:
                with kit.pool.acquire() as conn:
                    for sql in statements[:4]:
                        conn.execute(sql)

            await asyncio.to_thread(run)
        for sql in statements[4:]:  # statements that only take state away pass too
            await kit.run(sql)
        seen = await other.probe()
        assert (seen.work_mem, seen.claims, seen.temp_table, seen.locks) == ("4MB", "", False, 0)
    finally:
        for borrower in (kit, other):
            await borrower.close()
