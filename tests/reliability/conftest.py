"""Fault-test fixtures: a private DevStack per module, a fault relay in front of it, in-process sidecars.

``fault_stack``    a DevStack of the module's own (tests here restart PostgreSQL and terminate backends,
                   which must not disturb the session-wide ``stack``).
``pg_relay``       a :class:`FaultRelay` in front of ``fault_stack``'s direct (TLS) port.
``through_relay``  ``through_relay(stack, relay)``: the app role's URL through a relay, TLS verified (a helper).
``sidecar_runner`` ``sidecar_runner(**settings)`` starts a sidecar (uvloop, daemon thread), stopped at teardown.
``upstream``       what the sidecar forwards to, parametrised: ``postgres`` (the stack's PostgreSQL) or
                   ``pgbouncer`` (a PgBouncer 1.18 in transaction mode in front of it: the real deployment,
                   with Supavisor in its place). It restarts, stops and starts that upstream.
``upstream_relay`` a :class:`FaultRelay` in front of ``upstream`` (the network path between sidecar and it).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pytest
from sidecar.conftest import SidecarThread

from poolkit.core.dsn import Dsn
from poolkit.dev.devstack import DevStack, PgBouncerHandle, free_port
from poolkit.sidecar.policy.config import load_sidecar_settings

from .relay import FaultRelay

T = TypeVar("T")


@pytest.fixture(scope="module")
def fault_stack() -> Iterator[DevStack]:
    """A DevStack private to one test module (restarts and terminations stay inside it)."""
    with DevStack(max_connections=100) as started:
        yield started


@pytest.fixture
def pg_relay(fault_stack: DevStack) -> Iterator[FaultRelay]:
    """A fault relay to the private stack's PostgreSQL (TLS passes through it untouched)."""
    with FaultRelay(fault_stack.host, fault_stack.pg_port) as relay:
        yield relay


def through_relay(stack: DevStack, relay: FaultRelay, **params: str) -> str:
    """The app role's URL via ``relay``; ``verify-full`` still holds: the certificate names 127.0.0.1."""
    query = {"sslmode": "verify-full", "sslrootcert": str(stack.ca_file), **params}
    return Dsn(
        host=relay.listen_host,
        port=relay.port,
        user=stack.app_user,
        database=stack.database,
        password=stack.app_password,
        params=tuple(query.items()),
    ).to_url()


UpstreamKind = Literal["postgres", "pgbouncer"]
UPSTREAMS: tuple[UpstreamKind, ...] = ("postgres", "pgbouncer")


@dataclass
class Upstream:
    """The sidecar's upstream in a fault test: PostgreSQL itself, or a transaction pooler in front of it."""

    kind: UpstreamKind
    stack: DevStack
    bouncer: PgBouncerHandle | None = None

    @property
    def port(self) -> int:
        return self.bouncer.port if self.bouncer is not None else self.stack.pg_port

    @property
    def is_pooler(self) -> bool:
        return self.bouncer is not None

    def sidecar_settings(self, relay: FaultRelay | None = None) -> dict[str, Any]:
        """Sidecar settings that forward to this upstream (through ``relay`` when given), TLS verified.

        Behind the pooler the direct URL stays PostgreSQL's own (for what must not go through a pooler).
        """
        if relay is not None:
            url = through_relay(self.stack, relay)
        elif self.bouncer is not None:
            url = self.bouncer.url(sslmode="verify-full", sslrootcert=str(self.stack.ca_file))
        else:
            url = self.stack.url(via="direct", sslmode="verify-full")
        if self.bouncer is None:
            return {"direct_url": url, "upstream": "direct"}
        return {"pooled_url": url, "upstream": "pooled"}

    def restart(self) -> None:
        """PostgreSQL: ``pg_ctl restart -m fast``. PgBouncer: SIGKILL and start again on the same port."""
        if self.bouncer is None:
            self.stack.restart_postgres()
            return
        self.stop()
        self.start()

    def stop(self) -> None:
        """Take the upstream away: PostgreSQL stops (fast); PgBouncer is killed (SIGKILL, as a crashed pod)."""
        if self.bouncer is None:
            self.stack.stop_postgres()
            return
        pid = self.bouncer.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        self.bouncer._terminate()  # reaps the killed process

    def start(self) -> None:
        """Bring it back; returns once it answers."""
        if self.bouncer is None:
            self.stack.start_postgres()
        else:
            self.bouncer.start()

    def server_backend_pids(self) -> set[int]:
        """PgBouncer's server connections' backend pids (``SHOW SERVERS``); PostgreSQL: empty."""
        if self.bouncer is None:
            return set()
        return {int(row["remote_pid"]) for row in self.bouncer.admin("SHOW SERVERS") if row.get("remote_pid")}


@pytest.fixture(scope="module", params=UPSTREAMS)
def upstream(request: pytest.FixtureRequest, fault_stack: DevStack) -> Iterator[Upstream]:
    """PostgreSQL, or a PgBouncer (transaction mode, client TLS, a fixed port so that it restarts in place)."""
    if request.param == "postgres":
        yield Upstream("postgres", fault_stack)
        return
    bouncer = fault_stack.start_pgbouncer(client_tls=True, pool_size=20, port=free_port())
    try:
        yield Upstream("pgbouncer", fault_stack, bouncer)
    finally:
        bouncer.stop()


@pytest.fixture
def upstream_relay(upstream: Upstream) -> Iterator[FaultRelay]:
    """A fault relay on the network path between the sidecar (or a library pool) and ``upstream``."""
    with FaultRelay(upstream.stack.host, upstream.port) as relay:
        yield relay


# The sidecar tests' runner: a Sidecar on a uvloop loop in a daemon thread (``call``, ``url``, ``stop``).
SidecarRunner = SidecarThread


@pytest.fixture
def sidecar_runner(fault_stack: DevStack) -> Iterator[Callable[..., SidecarRunner]]:
    """``sidecar_runner(direct_url=..., max_size=...)``: a sidecar whose upstream defaults to the private stack."""
    for name in os.environ:
        if name.startswith("POOLKIT_SIDECAR_"):
            raise RuntimeError(f"{name} is set in the environment; unset it for the fault tests")
    started: list[SidecarRunner] = []

    def start(**overrides: Any) -> SidecarRunner:
        settings: dict[str, Any] = {
            "direct_url": fault_stack.url(via="direct", sslmode="verify-full"),
            "upstream": "direct",
            "sslrootcert": fault_stack.ca_file,
            "listen_port": 0,
            "http_port": 0,
            "max_size": 3,
            **overrides,
        }
        runner = SidecarRunner(load_sidecar_settings(None, **settings)).start()
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.stop()
