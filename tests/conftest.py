"""Shared pytest fixtures: one real PostgreSQL + PgBouncer stack per test session.

``stack``      a started :class:`poolkit.devstack.DevStack` (session-scoped; stopped at the end).
               Tests that change server state (restart, pool size, ...) should start their own
               ``DevStack`` or ``stack.start_pgbouncer(...)`` instead of altering this one.
``stack_env``  ``stack.env()`` in ``os.environ`` for one test, with every other URL variable
               poolkit or common app frameworks read removed, so nothing from the shell leaks in.

A missing PostgreSQL/PgBouncer binary fails the session with the install command; nothing skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from poolkit.devstack import DevStack

# CI runs a fixed set of generated examples so a red build is reproducible; local runs keep exploring
# (and what they find goes into the tests as @example).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Variables that would change what poolkit connects to; cleared by ``stack_env``.
URL_ENV_NAMES = (
    "POOLKIT_POOLED_URL",
    "POOLKIT_DIRECT_URL",
    "POOLKIT_SSLROOTCERT",
    "POOLKIT_POOL_MODE",
    "DATABASE_URL",
    "DIRECT_DATABASE_URL",
    "DIRECT_URL",
    "POSTGRES_URL",
    "POSTGRES_PRISMA_URL",
    "POSTGRES_URL_NON_POOLING",
    "SUPABASE_DB_URL",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSERVICE",
)


@pytest.fixture(scope="session")
def stack() -> Iterator[DevStack]:
    """A running DevStack shared by the whole session (PostgreSQL with TLS+SCRAM, PgBouncer)."""
    with DevStack() as started:
        yield started


@pytest.fixture
def stack_env(monkeypatch: pytest.MonkeyPatch, stack: DevStack) -> DevStack:
    """Point poolkit's environment at ``stack`` for one test; returns the stack."""
    for name in URL_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in stack.env().items():
        monkeypatch.setenv(name, value)
    return stack


@pytest.fixture
def pooled_url(stack: DevStack) -> str:
    """The PgBouncer URL marked the way Prisma marks it (``pgbouncer=true``), so poolkit detects the pooler.

    The devstack's PgBouncer listens on a random port, not Supabase's 6543, so port-based detection
    cannot apply; ``stack.pooled_url`` (no marker) is what a raw driver gets.
    """
    return stack.url(via="pgbouncer", pgbouncer="true")


def backend_pids(stack: DevStack, application_name: str) -> set[int]:
    """PIDs of the server backends a given application_name holds, as pg_stat_activity shows them."""
    import psycopg

    with psycopg.connect(stack.superuser_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
            (application_name,),
        ).fetchall()
    return {r[0] for r in rows}
