"""RLS-scoped sessions (poolkit.rls) against real row-level-security policies, through PgBouncer in transaction mode."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from poolkit import ConfigError, create_pool, create_sync_pool
from poolkit.dev.devstack import DevStack, PgBouncerHandle
from poolkit.rls import as_user, quote_role

ALICE = "11111111-1111-1111-1111-111111111111"
BOB = "22222222-2222-2222-2222-222222222222"

# Supabase's shapes: roles `authenticated`/`anon`, an `auth.uid()`-style function reading the claims
# (the newer request.jwt.claims JSON, the older request.jwt.claim.sub), and per-owner policies.
SETUP = f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN CREATE ROLE authenticated NOLOGIN; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN; END IF;
END $$;
GRANT authenticated, anon TO app;
DROP SCHEMA IF EXISTS rls_demo CASCADE;
CREATE SCHEMA rls_demo AUTHORIZATION app;
SET ROLE app;
CREATE FUNCTION rls_demo.uid() RETURNS uuid LANGUAGE sql STABLE AS $f$
  SELECT coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
  )::uuid
$f$;
CREATE TABLE rls_demo.notes (id serial PRIMARY KEY, owner uuid NOT NULL, body text NOT NULL);
ALTER TABLE rls_demo.notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows_read ON rls_demo.notes FOR SELECT TO authenticated USING (owner = rls_demo.uid());
CREATE POLICY own_rows_write ON rls_demo.notes FOR INSERT TO authenticated WITH CHECK (owner = rls_demo.uid());
GRANT USAGE ON SCHEMA rls_demo TO authenticated, anon;
GRANT SELECT, INSERT ON rls_demo.notes TO authenticated;
GRANT USAGE ON SEQUENCE rls_demo.notes_id_seq TO authenticated;
GRANT SELECT ON rls_demo.notes TO anon;
INSERT INTO rls_demo.notes (owner, body) VALUES
  ('{ALICE}', 'alice 1'), ('{ALICE}', 'alice 2'), ('{BOB}', 'bob 1');
RESET ROLE;
"""

# What the next caller on a server connection sees of the previous one.
PROBE = """SELECT pg_backend_pid(), current_user, current_setting('request.jwt.claims', true),
                  current_setting('request.jwt.claim.sub', true)"""


@pytest.fixture(scope="module")
def rls_stack(stack: DevStack) -> DevStack:
    stack.psql(SETUP)
    return stack


@pytest.fixture
def one_server(rls_stack: DevStack) -> Iterator[PgBouncerHandle]:
    """A transaction-mode PgBouncer with ONE server connection: every client provably shares it."""
    bouncer = rls_stack.start_pgbouncer(pool_mode="transaction", pool_size=1)
    try:
        yield bouncer
    finally:
        bouncer.stop()


def claims(sub: str) -> dict[str, Any]:
    return {"sub": sub, "role": "authenticated", "email": f"{sub[:4]}@example.com"}


def probe(url: str) -> tuple[int, str, str | None, str | None]:
    """A fresh client through ``url`` (a new client connection, not the pool's): its view of the session."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        row = conn.execute(PROBE).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_each_user_sees_only_their_rows(rls_stack: DevStack, pooled_url: str, driver: str) -> None:
    pool = await create_pool(driver=driver, pooled_url=pooled_url, sslrootcert=str(rls_stack.ca_file))
    q = "SELECT body FROM rls_demo.notes ORDER BY body"
    try:
        async with pool.as_user(claims(ALICE)) as conn:
            alice = [r[0] for r in await conn.fetch(q)] if driver == "asyncpg" else await _rows(conn, q)
        async with pool.as_user(claims(BOB)) as conn:
            bob = [r[0] for r in await conn.fetch(q)] if driver == "asyncpg" else await _rows(conn, q)
        async with pool.as_user(None, role="anon") as conn:
            anon = [r[0] for r in await conn.fetch(q)] if driver == "asyncpg" else await _rows(conn, q)
        # Without the scope the login role (the table owner) sees everything: the policies did the filtering.
        everyone = [r[0] for r in await pool.fetch(q)]
    finally:
        await pool.close()
    assert alice == ["alice 1", "alice 2"]
    assert bob == ["bob 1"]
    assert anon == []
    assert everyone == ["alice 1", "alice 2", "bob 1"]


async def _rows(conn: Any, q: str) -> list[Any]:
    cur = await conn.execute(q)
    return [r[0] for r in await cur.fetchall()]


async def insert_then_fail(pool: Any) -> None:
    async with pool.as_user(claims(ALICE)) as conn:
        await conn.execute("INSERT INTO rls_demo.notes (owner, body) VALUES ($1, 'rolled back')", uuid.UUID(ALICE))
        raise RuntimeError("boom")


def insert_then_fail_sync(pool: Any) -> None:
    with pool.as_user(claims(BOB)) as conn:
        conn.execute("INSERT INTO rls_demo.notes (owner, body) VALUES (%s, 'sync rolled back')", (BOB,))
        raise ValueError("boom")


async def test_policy_rejects_writing_for_another_user_and_rolls_back(rls_stack: DevStack, pooled_url: str) -> None:
    pool = await create_pool(pooled_url=pooled_url, sslrootcert=str(rls_stack.ca_file))
    try:
        with pytest.raises(Exception, match="row-level security") as info:
            async with pool.as_user(claims(ALICE)) as conn:
                await conn.execute("INSERT INTO rls_demo.notes (owner, body) VALUES ($1, 'forged')", uuid.UUID(BOB))
        assert getattr(info.value, "sqlstate", None) == "42501"
        # An error raised by the caller's own code rolls the block's writes back.
        with pytest.raises(RuntimeError, match="boom"):
            await insert_then_fail(pool)
        # A successful block commits.
        async with pool.as_user(claims(ALICE)) as conn:
            await conn.execute("INSERT INTO rls_demo.notes (owner, body) VALUES ($1, 'kept')", uuid.UUID(ALICE))
        bodies = {r[0] for r in await pool.fetch("SELECT body FROM rls_demo.notes")}
        await pool.execute("DELETE FROM rls_demo.notes WHERE body = 'kept'")
    finally:
        await pool.close()
    assert "kept" in bodies
    assert "rolled back" not in bodies
    assert "forged" not in bodies


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_next_client_on_the_same_server_connection_has_no_claims(
    rls_stack: DevStack, one_server: PgBouncerHandle, driver: str
) -> None:
    url = one_server.url(pgbouncer="true")
    pool = await create_pool(driver=driver, pooled_url=url, sslrootcert=str(rls_stack.ca_file))
    try:
        async with pool.as_user(claims(ALICE)) as conn:
            q = PROBE
            if driver == "asyncpg":
                inside = tuple(await conn.fetchrow(q))
            else:
                inside = tuple(await (await conn.execute(q)).fetchone())
    finally:
        await pool.close()
    after = probe(one_server.url())
    assert inside[0] == after[0], "PgBouncer pool_size=1: both clients must have used the same server connection"
    assert inside[1] == "authenticated"
    assert json.loads(inside[2])["sub"] == ALICE
    assert inside[3] == ALICE
    assert after[1] == "app", "the role reverted to the login role"
    assert after[2] in ("", None)
    assert after[3] in ("", None)


def test_sync_pool_as_user(rls_stack: DevStack, one_server: PgBouncerHandle) -> None:
    url = one_server.url(pgbouncer="true")
    pool = create_sync_pool(pooled_url=url, sslrootcert=str(rls_stack.ca_file))
    try:
        with pool.as_user(claims(BOB)) as conn:
            bodies = [r[0] for r in conn.execute("SELECT body FROM rls_demo.notes").fetchall()]
            inside = conn.execute(PROBE).fetchone()
        with pytest.raises(ValueError, match="boom"):
            insert_then_fail_sync(pool)
        remaining = pool.fetchval("SELECT count(*) FROM rls_demo.notes WHERE body = 'sync rolled back'")
    finally:
        pool.close()
    after = probe(one_server.url())
    assert bodies == ["bob 1"]
    assert inside is not None and inside[1] == "authenticated" and inside[3] == BOB
    assert remaining == 0
    assert after[0] == inside[0]
    assert after[1:] in (("app", "", ""), ("app", None, None))


def test_without_the_helper_session_settings_leak_to_the_next_client(
    rls_stack: DevStack, one_server: PgBouncerHandle
) -> None:
    """The failure as_user prevents: session-level set_config/SET ROLE outlive the client that ran them."""
    url = one_server.url()
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as first:
        leaker_pid = first.execute(
            "SELECT pg_backend_pid(), set_config('request.jwt.claims', %s, false), "
            "set_config('request.jwt.claim.sub', %s, false)",
            (json.dumps(claims(ALICE)), ALICE),
        ).fetchone()
        first.execute("SET ROLE authenticated")
    try:
        pid, user, leaked_claims, leaked_sub = probe(url)
        # A different, anonymous request (it sets no claims at all) now reads Alice's rows.
        with psycopg.connect(url, autocommit=True, prepare_threshold=None) as second:
            seen = [r[0] for r in second.execute("SELECT body FROM rls_demo.notes ORDER BY body").fetchall()]
    finally:
        with psycopg.connect(url, autocommit=True, prepare_threshold=None) as cleanup:
            cleanup.execute("RESET ALL")
            cleanup.execute("RESET ROLE")
    assert leaker_pid is not None and pid == leaker_pid[0]
    assert user == "authenticated"
    assert leaked_sub == ALICE
    assert leaked_claims is not None and json.loads(leaked_claims)["sub"] == ALICE
    assert seen == ["alice 1", "alice 2"]


async def test_role_is_quoted_and_validated(rls_stack: DevStack, pooled_url: str) -> None:
    assert quote_role("authenticated") == '"authenticated"'
    assert quote_role('we"ird') == '"we""ird"'
    for bad in ("", "  ", "x" * 64, "a\x00b", "NONE", "public"):
        with pytest.raises(ConfigError, match="role"):
            quote_role(bad)
    pool = await create_pool(pooled_url=pooled_url, sslrootcert=str(rls_stack.ca_file))
    try:
        with pytest.raises(ConfigError, match="claims"):
            as_user(pool, ["not", "a", "mapping"])  # type: ignore[arg-type]
        # An injection attempt is just a (nonexistent) role name once quoted.
        with pytest.raises(Exception, match="does not exist"):
            async with pool.as_user(claims(ALICE), role="authenticated; DROP TABLE rls_demo.notes"):
                pass
        assert await pool.fetchval("SELECT count(*) FROM rls_demo.notes") >= 3
        # role=None keeps the login role but still sets the claims.
        async with pool.as_user(claims(BOB), role=None) as conn:
            row = await conn.fetchrow("SELECT current_user, rls_demo.uid()")
    finally:
        await pool.close()
    assert row[0] == "app"
    assert str(row[1]) == BOB
