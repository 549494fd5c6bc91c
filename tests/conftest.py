"""Shared pytest fixtures: one real PostgreSQL + PgBouncer stack per test session.

``stack``      a started :class:`poolkit.dev.devstack.DevStack` (session-scoped; stopped at the end).
               Tests that change server state (restart, pool size, ...) should start their own
               ``DevStack`` or ``stack.start_pgbouncer(...)`` instead of altering this one.
``stack_env``  ``stack.env()`` in ``os.environ`` for one test, with every other URL variable
               poolkit or common app frameworks read removed, so nothing from the shell leaks in.

Secrets sweep: the session stack's password is ``SESSION_PASSWORD`` (recognisable: ``pk-sweep-...``).
Every record a ``poolkit.*`` logger emits and every poolkit error created during the session is checked
for it; a test during which it shows up fails, naming where. tests/reliability/test_secrets.py runs the
representative workloads at DEBUG level and checks reprs, metrics and the sidecar's own output as well.

A missing PostgreSQL/PgBouncer binary fails the session with the install command; nothing skips.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import settings

from poolkit.dev.devstack import DevStack, PgBouncerHandle
from poolkit.errors import PoolkitError

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


# ---------------------------------------------------------------- secrets sweep

SESSION_PASSWORD = f"pk-sweep-{secrets.token_hex(8)}"  # URL-safe, so it reads the same quoted or not


class SecretSweep:
    """Records every place a secret shows up in what poolkit produced: its log records and its errors."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.leaks: list[str] = []
        self.test = "(outside any test)"
        self._factory: Callable[..., logging.LogRecord] | None = None

    def check(self, where: str, text: str) -> None:
        if self.secret in text:
            self.leaks.append(f"{self.test}: {where}: {text.replace(self.secret, '<SESSION_PASSWORD>')[:500]}")

    def install(self) -> None:
        # A record factory sees each record poolkit emits without adding a handler, so logging behaves exactly
        # as it would without the sweep (poolkit's stderr fallback only writes when no handler is configured).
        factory = logging.getLogRecordFactory()
        self._factory = factory

        def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            made = factory(*args, **kwargs)
            if made.name.startswith("poolkit"):
                with contextlib.suppress(Exception):
                    self.check(f"log record on {made.name}", made.getMessage())
            return made

        logging.setLogRecordFactory(record)
        sweep = self

        # Observes the message of every poolkit error created, raised or caught, in any thread.
        def init(error: PoolkitError, *args: Any) -> None:
            super(PoolkitError, error).__init__(*args)  # what runs without the sweep (OSError's for ConnectError)
            sweep.check(type(error).__name__, " ".join(map(str, args)))

        PoolkitError.__init__ = init  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        if self._factory is not None:
            logging.setLogRecordFactory(self._factory)
        with contextlib.suppress(AttributeError):
            del PoolkitError.__init__


SWEEP = SecretSweep(SESSION_PASSWORD)


def pytest_sessionstart(session: pytest.Session) -> None:
    SWEEP.install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    SWEEP.uninstall()
    outside = [leak for leak in SWEEP.leaks if leak.startswith("(outside any test)")]
    if outside:
        reporter = session.config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("the session password appeared outside any test:", red=True)
            for leak in outside:
                reporter.write_line(f"  {leak}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _secret_sweep(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test during which poolkit logged or raised the session password."""
    SWEEP.test = request.node.nodeid
    seen = len(SWEEP.leaks)
    yield
    leaks, SWEEP.test = SWEEP.leaks[seen:], "(outside any test)"
    if leaks:
        pytest.fail("poolkit showed the session password:\n" + "\n".join(leaks), pytrace=False)


@pytest.fixture(scope="session")
def stack() -> Iterator[DevStack]:
    """A running DevStack shared by the whole session (PostgreSQL with TLS+SCRAM, PgBouncer).

    Its password is ``SESSION_PASSWORD``, which the secrets sweep looks for.
    """
    with DevStack(password=SESSION_PASSWORD) as started:
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
def misnamed_bouncer(stack: DevStack) -> Iterator[tuple[PgBouncerHandle, Path]]:
    """A PgBouncer whose certificate (from its own CA) names db.example.test, not the 127.0.0.1 we dial.

    Yields the PgBouncer and its CA file: a client that verifies the CA but not the host name connects.
    """
    ca = trustme.CA()
    cert = ca.issue_cert("db.example.test")
    tls = stack.base_dir / "misnamed-tls"  # readable by the server's user, unlike pytest's tmp_path
    tls.mkdir(exist_ok=True)
    ca.cert_pem.write_to_path(str(tls / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tls / "server.crt"))
    cert.private_key_pem.write_to_path(str(tls / "server.key"))
    os.chmod(tls / "server.key", 0o600)
    if os.geteuid() == 0:
        for path in (tls, *tls.iterdir()):
            shutil.chown(path, "postgres")
    bouncer = stack.start_pgbouncer(
        client_tls_key_file=str(tls / "server.key"),
        client_tls_cert_file=str(tls / "server.crt"),
        client_tls_ca_file=str(tls / "ca.pem"),
    )
    yield bouncer, tls / "ca.pem"
    bouncer.stop()


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
