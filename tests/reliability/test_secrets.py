"""Secrets: representative workloads run with the session stack's recognisable password (``pk-sweep-...``,
see tests/conftest.py), and the password appears in nothing poolkit produced.

Checked: every log record (poolkit's loggers at DEBUG, so INFO events and the dev query log are included),
the Prometheus exposition, the message, repr and chained causes of every error (wrong password, unknown
host, refused port, exhausted pool, bad settings), the repr/str of pools, settings, URLs and the stack,
and a sidecar process's whole output (including a login the upstream refuses and a SIGHUP reload), its
/metrics and every SHOW command of its admin console. The conftest sweep checks poolkit's log records and
errors for the rest of the suite; this module is where each kind of output is produced on purpose.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client import REGISTRY, generate_latest

import poolkit
from poolkit.core.dsn import Dsn
from poolkit.dev.devstack import DevStack
from poolkit.sidecar.policy.config import load_sidecar_settings
from poolkit.sidecar.service.admin import COMMANDS
from poolkit.sidecar.wire import protocol as p

from .child_sidecar import ChildSidecar, free_port

WRONG = "pk-wrong-Password-4411"  # a wrong password must not be shown either


class Seen:
    """Everything poolkit showed during a workload, searched for secrets at the end."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text: object) -> None:
        self.texts.append((where, str(text)))

    def error(self, where: str, exc: BaseException) -> None:
        """The message and repr of an error and of everything chained to it (a traceback shows them all)."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            self.add(f"{where}: {type(current).__name__}", f"{current} {current!r}")
            current = current.__cause__ or current.__context__

    def assert_clean(self, *secrets: str) -> None:
        for secret in secrets:
            leaks = [f"{where}: {text[:300]}" for where, text in self.texts if secret in text]
            assert not leaks, "\n".join(leaks)


@pytest.fixture
def seen(caplog: pytest.LogCaptureFixture, stack: DevStack) -> Iterator[Seen]:
    assert stack.app_password.startswith("pk-sweep-"), "the session stack must use the recognisable password"
    caplog.set_level(logging.DEBUG, logger="poolkit")
    collected = Seen()
    yield collected
    for record in caplog.records:
        collected.add(f"log record on {record.name}", record.getMessage())
    collected.add("metrics", generate_latest(REGISTRY).decode())
    collected.assert_clean(stack.app_password, WRONG)


def with_password(url: str, password: str) -> str:
    return dataclasses.replace(Dsn.parse(url), password=password).to_url()


def with_host(url: str, host: str, port: int | None = None) -> str:
    dsn = Dsn.parse(url)
    return dataclasses.replace(dsn, host=host, port=port or dsn.port).to_url()


# ---------------------------------------------------------------- library pools


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_library_pool_workload_never_shows_the_password(
    stack: DevStack, pooled_url: str, seen: Seen, caplog: pytest.LogCaptureFixture, driver: str
) -> None:
    pool = await poolkit.create_pool(
        driver=driver,
        name=f"secrets-{driver}",
        pooled_url=pooled_url,
        direct_url=stack.direct_url,
        sslrootcert=stack.ca_file,
        max_size=1,
        acquire_timeout=0.3,
        slow_query_seconds=0.001,  # every query is "slow": each one logs an event
        env="development",
        query_log=True,
    )
    seen.add("pool repr", repr(pool))
    seen.add("pool str", str(pool))
    try:
        marker = "$1" if driver == "asyncpg" else "%s"
        assert await pool.fetchval(f"SELECT {marker}::text", "a parameter") == "a parameter"
        await pool.execute("CREATE TABLE IF NOT EXISTS secrets_t (x int)")  # DDL: routed to the direct URL
        await pool.execute("SELECT pg_sleep(0.01)")  # slow for sure
        with pytest.raises(Exception, match="division by zero") as failed:
            await pool.fetchval("SELECT 1 / 0")
        seen.error("query error", failed.value)
        async with pool.acquire():
            with pytest.raises(poolkit.PoolTimeout) as timeout:
                async with pool.acquire(timeout=0.2):
                    pass
        seen.error("exhausted", timeout.value)
        seen.add("pool repr after use", repr(pool))
    finally:
        await pool.close()

    failures = {
        "wrong password": with_password(pooled_url, WRONG),
        "unknown host": with_host(pooled_url, "db.invalid"),
        "refused port": with_host(pooled_url, "127.0.0.1", free_port()),
    }
    for what, url in failures.items():
        with pytest.raises(poolkit.ConnectError) as info:
            await poolkit.create_pool(driver=driver, pooled_url=url, connect_timeout=5, name=f"secrets-{driver}-bad")
        seen.error(what, info.value)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "slow_query" in messages and "pool_exhausted" in messages, "the workload did not log what it should"


def test_sync_pool_workload_never_shows_the_password(stack: DevStack, pooled_url: str, seen: Seen) -> None:
    pool = poolkit.create_sync_pool(
        name="secrets-sync", pooled_url=pooled_url, max_size=1, acquire_timeout=0.3, slow_query_seconds=0.001
    )
    try:
        assert pool.fetchval("SELECT %s::text", "a parameter") == "a parameter"
        with pool.acquire(), pytest.raises(poolkit.PoolTimeout) as timeout, pool.acquire(timeout=0.2):
            pass
        seen.error("exhausted", timeout.value)
        seen.add("sync pool repr", repr(pool))
    finally:
        pool.close()
    with pytest.raises(poolkit.AuthenticationFailed) as info:
        poolkit.create_sync_pool(pooled_url=with_password(pooled_url, WRONG))
    seen.error("wrong password", info.value)


def test_settings_urls_and_the_stack_never_show_the_password(stack: DevStack, pooled_url: str, seen: Seen) -> None:
    settings = poolkit.load_settings(pooled_url=pooled_url, direct_url=stack.direct_url)
    seen.add("Settings repr", repr(settings))
    seen.add("Settings str", str(settings))
    seen.add("Settings json", settings.model_dump_json())
    dsn = Dsn.parse(stack.direct_url)
    seen.add("Dsn repr", repr(dsn))
    seen.add("Dsn str", str(dsn))
    seen.add("Dsn redacted", dsn.redacted())
    seen.add("DevStack repr", repr(stack))
    sidecar = load_sidecar_settings(None, direct_url=stack.direct_url, sslrootcert=stack.ca_file, users={"a": WRONG})
    seen.add("SidecarSettings repr", repr(sidecar))
    seen.add("SidecarSettings str", str(sidecar))
    bad = [
        {"pooled_url": with_host(pooled_url, "db.example.com") + "&sslmode=prefer"},
        {"pooled_url": stack.direct_url.replace(f":{stack.pg_port}/", ":99999/")},
        {"pooled_url": "mysql" + stack.direct_url.removeprefix("postgresql")},
        {"pooled_url": stack.direct_url, "max_size": 9},
    ]
    for overrides in bad:
        with pytest.raises(poolkit.ConfigError) as info:
            poolkit.load_settings(**overrides)
        seen.error("settings error", info.value)


# ---------------------------------------------------------------- the sidecar process


def admin_show(port: int, command: str) -> bytes:
    """Raw bytes of one SHOW command on the sidecar's admin console (simple query protocol)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(p.startup_message({"user": "app", "database": "poolkit"}))
        data = b""
        for query in (None, command):
            if query is not None:
                sock.sendall(p.query(query))
            reader = p.MessageReader(side="server", max_message_size=1 << 24)
            messages: list[tuple[bytes, bytes]] = []
            while not messages or messages[-1][0] != b"Z":
                chunk = sock.recv(65536)
                assert chunk, "admin console closed"
                data += chunk
                messages.extend(reader.feed(chunk))
        return data


def test_sidecar_output_metrics_and_admin_console_never_show_the_password(
    stack: DevStack, seen: Seen, tmp_path: Path
) -> None:
    child = ChildSidecar(stack, slow_query_seconds=0.001)
    refused = ChildSidecar(stack, direct_url=with_password(stack.url(via="direct", sslmode="verify-full"), WRONG))
    try:
        with psycopg.connect(child.url(), prepare_threshold=None) as conn:
            conn.execute("SELECT %s::text", ("a parameter",))
            conn.execute("SELECT pg_sleep(0.01)")  # slow for sure: a slow_query event with the SQL
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / 0")
        with socket.create_connection(("127.0.0.1", child.port), timeout=10) as garbage:
            garbage.sendall(b"\x00\x00\x00\x08garbage!")  # a protocol error is logged with the client
            garbage.recv(4096)
        for command in COMMANDS:
            seen.add(f"SHOW {command}", admin_show(child.port, f"SHOW {command}").decode("utf-8", "replace"))
        seen.add("sidecar metrics", httpx.get(child.metrics_url, timeout=10).text)
        for path in ("healthz", "readyz"):
            seen.add(path, httpx.get(f"http://127.0.0.1:{child.http_port}/{path}", timeout=10).text)
        child.proc.send_signal(signal.SIGHUP)  # a reload logs what changed
        time.sleep(0.5)

        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(refused.url(), prepare_threshold=None)
        seen.add("client error from a refused upstream login", str(info.value))
        assert "password authentication failed" in str(info.value)
        seen.add("readyz of the refused sidecar", httpx.get(f"http://127.0.0.1:{refused.http_port}/readyz").text)
    finally:
        assert child.stop() == 0
        refused.stop()
    output = child.output()
    assert "slow_query" in output and "client_protocol_error" in output and "sidecar_reloaded" in output, output
    assert "upstream_connect_failed" in refused.output(), refused.output()
    seen.add("sidecar output", output)
    seen.add("refused sidecar output", refused.output())


def test_the_checks_catch_a_password_when_there_is_one(stack: DevStack) -> None:
    """Both nets are live: the conftest sweep (log records, poolkit errors) and the checks above."""
    from conftest import SWEEP  # tests/conftest.py, the session-wide sweep

    before = len(SWEEP.leaks)
    logging.getLogger("poolkit.dev.demo").warning("connecting to %s", stack.direct_url)  # what poolkit must never do
    poolkit.ConfigError(f"cannot use {stack.direct_url}")
    caught = SWEEP.leaks[before:]
    del SWEEP.leaks[before:]  # shown on purpose here: not a leak of the product
    assert [leak.split(": ")[1] for leak in caught] == ["log record on poolkit.dev.demo", "ConfigError"], caught
    assert all("<SESSION_PASSWORD>" in leak and stack.app_password not in leak for leak in caught)
    raw = Seen()
    raw.add("a raw URL", stack.direct_url)
    with pytest.raises(AssertionError, match="a raw URL"):
        raw.assert_clean(stack.app_password)
