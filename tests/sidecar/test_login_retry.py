"""server_login_retry: a dead upstream costs one connect attempt per retry delay, and clients still hear promptly."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg
import pytest

from poolkit.dev.devstack import DevStack

if TYPE_CHECKING:
    from .conftest import SidecarThread

Factory = Callable[..., "SidecarThread"]
STORM = 1.5  # seconds of clients retrying against a dead upstream
CLIENTS = 8


def dead_url(stack: DevStack) -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    return stack.url(via="direct").replace(f":{stack.pg_port}/", f":{port}/"), port


@pytest.mark.parametrize("retry", [1.0, 0.0])
def test_a_dead_upstream_gets_one_attempt_per_server_login_retry(
    retry: float, sidecar_factory: Factory, stack: DevStack
) -> None:
    url, port = dead_url(stack)
    sidecar = sidecar_factory(direct_url=url, connect_timeout=2.0, server_login_retry=retry)
    began = time.monotonic()
    answered: list[float] = []
    failures: list[str] = []

    def client() -> None:
        # An app retrying in a loop, as serverless handlers do during an outage.
        while time.monotonic() - began < STORM:
            asked = time.monotonic()
            try:
                psycopg.connect(sidecar.url(), prepare_threshold=None).close()
                failures.append("connected to a dead upstream")
            except psycopg.OperationalError as exc:
                if not re.search(f"cannot reach its upstream.*127.0.0.1:{port}", str(exc)):
                    failures.append(str(exc))
            answered.append(time.monotonic() - asked)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    attempts = sidecar.call(lambda app: app.pool.stats.upstream_errors["connect"])
    assert not failures, failures
    # Every client heard the error within about one retry delay (a generous bound for a loaded machine).
    assert max(answered) < retry + 4.0
    if retry:
        # One at the start, then about one per second: not one per client request.
        assert attempts <= 1 + STORM / retry + 1, (attempts, len(answered))
    else:
        # Without the delay every login is a new attempt: the storm this setting prevents.
        assert attempts >= 10, (attempts, len(answered))
