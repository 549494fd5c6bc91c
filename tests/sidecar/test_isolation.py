"""Session state never crosses clients through the sidecar; the same sequence through PgBouncer leaks.

Each test: client A uses a session feature and disconnects; client B, the next to get that upstream
backend (one server connection: ``pg_backend_pid()`` is checked), looks for it. Through the sidecar
(max_size=1) A was pinned and its server reset before B got it; through PgBouncer 1.18 in
transaction mode with pool_size=1, B sees A's state. Both run in the same test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from poolkit.dev.devstack import DevStack, PgBouncerHandle

from .conftest import SidecarThread, upstream_settings


@pytest.fixture(scope="module")
def sidecar(stack: DevStack) -> Iterator[SidecarThread]:
    """One upstream connection: every client provably shares one server backend."""
    running = SidecarThread(upstream_settings(stack, max_size=1)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def bouncer(stack: DevStack) -> Iterator[PgBouncerHandle]:
    """PgBouncer in transaction mode with one server connection (what the sidecar replaces)."""
    handle = stack.start_pgbouncer(client_tls=False, pool_size=1)
    yield handle
    handle.stop()


@dataclass
class Seen:
    """What B saw, and whether A and B shared a backend."""

    pid_a: int
    pid_b: int
    value: object


def _connect(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True, prepare_threshold=None)


def run(url: str, feature: list[str], probe: str, *, cleanup: bool = False) -> Seen:
    """A runs ``feature`` and leaves; then B runs ``probe`` (a scalar SQL expression)."""
    with _connect(url) as a:
        for statement in feature:
            a.execute(statement)
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    with _connect(url) as b:
        row = b.execute(f"SELECT pg_backend_pid(), ({probe})").fetchone()
        assert row is not None
        if cleanup:  # PgBouncer keeps what leaked for the next test: wipe it
            b.execute("DISCARD ALL")
    return Seen(int(pid_a), int(row[0]), row[1])  # type: ignore[call-overload]


def both(sidecar: SidecarThread, bouncer: PgBouncerHandle, feature: list[str], probe: str) -> tuple[Seen, Seen]:
    through_sidecar = run(sidecar.url(), feature, probe)
    through_bouncer = run(bouncer.url(), feature, probe, cleanup=True)
    assert through_sidecar.pid_a == through_sidecar.pid_b  # B got A's backend: the sidecar reused it
    assert through_bouncer.pid_a == through_bouncer.pid_b
    return through_sidecar, through_bouncer


def test_plain_set(sidecar: SidecarThread, bouncer: PgBouncerHandle) -> None:
    clean, leaked = both(sidecar, bouncer, ["SET statement_timeout = '4321s'"], "current_setting('statement_timeout')")
    assert clean.value == "0"
    assert leaked.value == "4321s"


def test_set_role(sidecar: SidecarThread, bouncer: PgBouncerHandle, stack: DevStack) -> None:
    stack.psql(
        "DO $$ BEGIN CREATE ROLE pin_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
        "GRANT pin_reader TO app;"
    )
    clean, leaked = both(sidecar, bouncer, ["SET ROLE pin_reader"], "current_user")
    assert clean.value == "app"
    assert leaked.value == "pin_reader"


def test_set_config_session(sidecar: SidecarThread, bouncer: PgBouncerHandle) -> None:
    clean, leaked = both(
        sidecar,
        bouncer,
        ["SELECT set_config('app.pin_tenant', 'acme', false)"],
        "coalesce(current_setting('app.pin_tenant', true), '')",
    )
    assert clean.value == ""
    assert leaked.value == "acme"


def test_temporary_table(sidecar: SidecarThread, bouncer: PgBouncerHandle) -> None:
    clean, leaked = both(
        sidecar,
        bouncer,
        ["CREATE TEMP TABLE pin_tmp (secret text)", "INSERT INTO pin_tmp VALUES ('a''s data')"],
        "to_regclass('pin_tmp')::text",
    )
    assert clean.value is None
    assert leaked.value == "pin_tmp"


def test_advisory_lock(sidecar: SidecarThread, bouncer: PgBouncerHandle, stack: DevStack) -> None:
    probe = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    with _connect(stack.superuser_url) as outsider:

        def free() -> bool:
            taken = outsider.execute("SELECT pg_try_advisory_lock(7345)").fetchone()[0]  # type: ignore[index]
            outsider.execute("SELECT pg_advisory_unlock_all()")
            return bool(taken)

        clean = run(sidecar.url(), ["SELECT pg_advisory_lock(7345)"], probe)
        assert (clean.pid_a, clean.value) == (clean.pid_b, 0)
        assert free()  # A's lock went with A
        leaked = run(bouncer.url(), ["SELECT pg_advisory_lock(7345)"], probe)
        assert (leaked.pid_a, leaked.value) == (leaked.pid_b, 1)
        assert not free()  # held by a backend no client of PgBouncer knows it holds
        with _connect(bouncer.url()) as b:
            b.execute("SELECT pg_advisory_unlock_all()")
        assert free()


def test_listen(sidecar: SidecarThread, bouncer: PgBouncerHandle) -> None:
    clean, leaked = both(sidecar, bouncer, ["LISTEN pin_channel"], "SELECT count(*) FROM pg_listening_channels()")
    assert clean.value == 0
    assert leaked.value == 1


def test_rls_claims(sidecar: SidecarThread, bouncer: PgBouncerHandle) -> None:
    claims = '{"sub": "alice", "role": "authenticated"}'
    probe = "coalesce(current_setting('request.jwt.claims', true), '')"

    def transaction_local(url: str) -> Seen:
        with _connect(url) as a:
            with a.transaction():
                a.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
                assert a.execute(f"SELECT {probe}").fetchone() == (claims,)
            pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        with _connect(url) as b:
            row = b.execute(f"SELECT pg_backend_pid(), {probe}").fetchone()
        assert row is not None and row[0] == pid_a
        return Seen(int(pid_a), int(row[0]), row[1])  # type: ignore[call-overload]

    # Transaction-local claims (the Supabase/PostgREST way) end with the transaction, either way.
    assert transaction_local(sidecar.url()).value == ""
    assert transaction_local(bouncer.url()).value == ""
    # Set for the session instead, they reach the next client through PgBouncer, not through the sidecar.
    clean, leaked = both(sidecar, bouncer, [f"SELECT set_config('request.jwt.claims', '{claims}', false)"], probe)
    assert clean.value == ""
    assert leaked.value == claims


def test_sql_prepare(sidecar: SidecarThread, bouncer: PgBouncerHandle) -> None:
    clean, leaked = both(
        sidecar,
        bouncer,
        ["PREPARE pin_stmt (int) AS SELECT $1 * 2", "EXECUTE pin_stmt (21)"],
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'pin_stmt'",
    )
    assert clean.value == 0
    assert leaked.value == 1
