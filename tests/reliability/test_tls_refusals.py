"""TLS refusals that tests/test_tls.py and tests/sidecar/test_auth.py do not cover yet.

Already covered there: async pools (asyncpg, psycopg) refusing a server without TLS under ``require``,
a wrong CA and a wrong host name under ``verify-full``; the sync pool under ``require``; the sidecar's
upstream with a wrong CA (text and metric). Here: the sync pool under ``verify-full`` (wrong CA, wrong
host name), and the sidecar's upstream under ``verify-full`` with a wrong host name and under ``require``
against a server without TLS, each with the error class and reason, the text, the metric, and the same
set-up accepted once the check is relaxed (so the refusal is about TLS, not the set-up).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trustme

import poolkit
from poolkit.dev.devstack import DevStack, PgBouncerHandle
from poolkit.errors import ConnectError, SSLError
from poolkit.sidecar.conn.pool import UpstreamPool
from poolkit.sidecar.conn.server import ServerConnection
from poolkit.sidecar.policy.config import load_sidecar_settings

from .conftest import SidecarRunner

Start = Callable[..., SidecarRunner]


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def plain_bouncer(stack: DevStack) -> Iterator[PgBouncerHandle]:
    """A PgBouncer that offers no TLS at all (it answers 'N' to SSLRequest)."""
    bouncer = stack.start_pgbouncer(client_tls=False)
    yield bouncer
    bouncer.stop()


@pytest.fixture
def start(stack: DevStack) -> Iterator[Start]:
    """``start(upstream_url, **settings)``: an in-process sidecar forwarding to ``upstream_url``."""
    started: list[SidecarRunner] = []

    def run(upstream_url: str, **overrides: Any) -> SidecarRunner:
        settings = load_sidecar_settings(
            None, direct_url=upstream_url, upstream="direct", listen_port=0, http_port=0, max_size=1, **overrides
        )
        runner = SidecarRunner(settings).start()
        started.append(runner)
        return runner

    yield run
    for runner in started:
        runner.stop()


def upstream_error(sidecar: SidecarRunner) -> ConnectError:
    """Ask the sidecar's pool for its first upstream connection; return the error it reports."""
    assert sidecar.loop is not None and sidecar.app is not None
    future = asyncio.run_coroutine_threadsafe(sidecar.app.pool.ensure_welcome(), sidecar.loop)
    with pytest.raises(ConnectError) as info:
        future.result(timeout=30)
    return info.value


def tls_errors(sidecar: SidecarRunner) -> float:
    port = sidecar.app.http_port if sidecar.app is not None else 0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith('poolkit_sidecar_upstream_errors_total{kind="tls"'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def connect_once(upstream_url: str, **overrides: Any) -> BaseException | None:
    """One upstream connection attempt (ServerConnection.connect, before the pool wraps the error): its error."""
    settings = load_sidecar_settings(None, direct_url=upstream_url, upstream="direct", **overrides)
    pool = UpstreamPool(settings)
    server = ServerConnection(pool, 1, 0)
    try:
        await asyncio.wait_for(server.connect(pool.dsn, pool.tls, pool.startup), 30)
    except Exception as exc:
        return exc
    finally:
        if server.transport is not None:
            server.transport.abort()
    return None


# ---------------------------------------------------------------- sync library pool


def test_sync_verify_full_refuses_a_wrong_ca(stack: DevStack, other_ca: Path) -> None:
    with pytest.raises(poolkit.SSLError) as info:
        poolkit.create_sync_pool(pooled_url=stack.direct_url, sslmode="verify-full", sslrootcert=other_ca)
    assert info.value.reason == "ssl_verify"
    assert "POOLKIT_SSLROOTCERT" in str(info.value)
    assert stack.app_password not in str(info.value)
    pool = poolkit.create_sync_pool(pooled_url=stack.direct_url, sslmode="verify-full", sslrootcert=stack.ca_file)
    try:
        assert pool.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    finally:
        pool.close()


def test_sync_verify_full_refuses_a_wrong_host_name(misnamed_bouncer: tuple[PgBouncerHandle, Path]) -> None:
    bouncer, ca_file = misnamed_bouncer
    url = poolkit.Dsn.parse(bouncer.url()).without_params("sslmode").to_url()
    with pytest.raises(poolkit.SSLError) as info:
        poolkit.create_sync_pool(pooled_url=url, pool_mode="transaction", sslmode="verify-full", sslrootcert=ca_file)
    assert info.value.reason == "ssl_hostname", info.value
    pool = poolkit.create_sync_pool(pooled_url=url, pool_mode="transaction", sslmode="verify-ca", sslrootcert=ca_file)
    try:
        assert pool.fetchval("SELECT 1") == 1
    finally:
        pool.close()


# ---------------------------------------------------------------- the sidecar's upstream


async def test_sidecar_upstream_verify_full_refuses_a_wrong_host_name(
    misnamed_bouncer: tuple[PgBouncerHandle, Path],
) -> None:
    bouncer, ca_file = misnamed_bouncer
    url = bouncer.url(sslmode="verify-full")
    error = await connect_once(url, sslrootcert=ca_file)
    assert isinstance(error, SSLError) and error.reason == "tls", repr(error)
    assert "TLS to the upstream postgresql://app:***@" in str(error)
    assert "certificate verify failed" in str(error) and "mismatch" in str(error), error
    # verify-ca checks the CA only: the same server is accepted, so the refusal above was about the name.
    assert await connect_once(bouncer.url(sslmode="verify-ca"), sslrootcert=ca_file) is None


def test_sidecar_with_a_misnamed_upstream_tells_clients_why(
    misnamed_bouncer: tuple[PgBouncerHandle, Path], start: Start, stack: DevStack
) -> None:
    bouncer, ca_file = misnamed_bouncer
    sidecar = start(bouncer.url(sslmode="verify-full"), sslrootcert=ca_file)
    error = upstream_error(sidecar)
    assert error.reason == "tls"
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar.url(), prepare_threshold=None)
    message = str(info.value)
    assert "cannot reach its upstream: TLS to the upstream" in message
    assert "mismatch" in message, message
    assert stack.app_password not in message
    assert tls_errors(sidecar) >= 2


async def test_sidecar_upstream_require_refuses_a_server_without_tls(plain_bouncer: PgBouncerHandle) -> None:
    error = await connect_once(plain_bouncer.url(sslmode="require"))
    assert isinstance(error, SSLError) and error.reason == "tls", repr(error)
    assert "does not accept TLS but sslmode=require" in str(error)
    # Without sslmode in the URL the sidecar's default is require too.
    error = await connect_once(poolkit.Dsn.parse(plain_bouncer.url()).without_params("sslmode").to_url())
    assert isinstance(error, SSLError) and "sslmode=require" in str(error), repr(error)
    # Plain text, allowed only to a loopback upstream, reaches the same server: the refusal was about TLS.
    assert await connect_once(plain_bouncer.url(sslmode="disable")) is None


def test_sidecar_with_a_plain_text_upstream_tells_clients_why(
    plain_bouncer: PgBouncerHandle, start: Start, stack: DevStack
) -> None:
    sidecar = start(plain_bouncer.url(sslmode="require"))
    assert upstream_error(sidecar).reason == "tls"
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar.url(), prepare_threshold=None)
    message = str(info.value)
    assert "does not accept TLS but sslmode=require" in message
    assert stack.app_password not in message
    assert tls_errors(sidecar) >= 2


async def test_sidecar_upstream_verify_full_refuses_a_wrong_ca(stack: DevStack, other_ca: Path) -> None:
    # test_auth.py checks what clients see; here the error class the pool classifies as kind="tls".
    error = await connect_once(stack.url(via="direct", sslmode="verify-full"), sslrootcert=other_ca)
    assert isinstance(error, SSLError) and error.reason == "tls", repr(error)
    assert "certificate verify failed" in str(error)
    assert stack.app_password not in str(error)
