"""Fault-test fixtures: a private DevStack per module, a fault relay in front of it, in-process sidecars.

``fault_stack``    a DevStack of the module's own (tests here restart PostgreSQL and terminate backends,
                   which must not disturb the session-wide ``stack``).
``pg_relay``       a :class:`FaultRelay` in front of ``fault_stack``'s direct (TLS) port.
``through_relay``  ``through_relay(stack, relay)``: the app role's URL through a relay, TLS verified (a helper).
``sidecar_runner`` ``sidecar_runner(**settings)`` starts a sidecar (uvloop, daemon thread), stopped at teardown.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from sidecar.conftest import SidecarThread

from poolkit.devstack import DevStack
from poolkit.dsn import Dsn
from poolkit.sidecar.config import load_sidecar_settings

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
