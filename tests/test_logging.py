"""poolkit's events on the real stack: JSON in production, console text in development, the dev query log,
and structlog's global configuration left to the app unless it calls ``configure_globally()``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import poolkit
from poolkit.dev.devstack import DevStack

SECRET = "SECRET-PARAM-123"
LITERAL = "SECRET-LITERAL-456"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, pool: str) -> list[str]:
        return [r.getMessage() for r in self.records if pool in r.getMessage()]


@pytest.fixture
def lines() -> Iterator[Lines]:
    """Catches poolkit's lines without changing any logger level (so level handling is tested too)."""
    handler = Lines()
    logger = logging.getLogger("poolkit")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def name_for(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def slow_query(driver: str, name: str, **settings: Any) -> None:
    sql = "select pg_sleep($1), $2::text" if driver == "asyncpg" else "select pg_sleep(%s), %s::text"
    pool = await poolkit.create_pool(
        driver=driver, name=name, slow_query_seconds=0.05, pool_mode="transaction", **settings
    )
    try:
        await pool.fetch(sql, 0.1, SECRET)
    finally:
        await pool.close()


async def test_production_events_are_json_lines(stack_env: DevStack, lines: Lines) -> None:
    name = name_for("prod")
    await slow_query("asyncpg", name)
    [line] = lines.of(name)
    event = json.loads(line)
    assert event["event"] == "slow_query"
    assert event["level"] == "warning"
    assert event["sql"] == "select pg_sleep($1), $2::text"
    assert SECRET not in line


@pytest.mark.parametrize("how", ["setting", "POOLKIT_ENV"])
async def test_development_events_are_console_text(
    stack_env: DevStack, lines: Lines, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    name = name_for("dev")
    if how == "setting":
        await slow_query("psycopg", name, env="development")
    else:
        monkeypatch.setenv("POOLKIT_ENV", "development")
        await slow_query("psycopg", name)
    [line] = lines.of(name)
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert "slow_query" in line
    assert f"pool={name}" in line
    assert "sql='select pg_sleep(%s), %s::text'" in line
    assert SECRET not in line


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg", "psycopg-sync"])
async def test_query_log_in_development_logs_every_statement_normalised(
    stack_env: DevStack, lines: Lines, driver: str
) -> None:
    name = name_for("qlog")
    p = "$1" if driver == "asyncpg" else "%s"
    statements = [f"select {p}::text", f"select '{LITERAL}'::text, 42", f"select {p}::int + 1"]
    settings: dict[str, Any] = {
        "name": name,
        "env": "development",
        "query_log": True,
        "pool_mode": "transaction",
    }
    if driver == "psycopg-sync":
        pool: Any = poolkit.create_sync_pool(**settings)
        pool.fetch(statements[0], SECRET)
        pool.fetch(statements[1])
        pool.fetch(statements[2], 41)
        pool.close()
    else:
        apool = await poolkit.create_pool(driver=driver, **settings)
        await apool.fetch(statements[0], SECRET)
        await apool.fetch(statements[1])
        await apool.fetch(statements[2], 41)
        await apool.close()
    got = [r.getMessage() for r in lines.records if r.name == "poolkit.query" and name in r.getMessage()]
    assert len(got) == 3
    assert [r.levelno for r in lines.records if r.name == "poolkit.query" and name in r.getMessage()] == [
        logging.INFO
    ] * 3
    assert f"sql='select {p}::text'" in got[0]
    assert "sql='select ?::text, ?'" in got[1]
    assert f"sql='select {p}::int + ?'" in got[2]
    assert all("duration_s=" in line for line in got)
    assert not [line for line in lines.of(name) if SECRET in line or LITERAL in line]


async def test_query_log_is_ignored_in_production_and_says_so(stack_env: DevStack, lines: Lines) -> None:
    name = name_for("qlog-prod")
    pool = await poolkit.create_pool(driver="asyncpg", name=name, query_log=True, pool_mode="transaction")
    await pool.fetch("select 1")
    await pool.close()
    assert [r for r in lines.records if r.name == "poolkit.query" and name in r.getMessage()] == []
    [warning] = [json.loads(line) for line in lines.of(name)]
    assert warning["event"] == "query_log_ignored"
    assert "POOLKIT_ENV=development" in warning["hint"]


def run_script(stack: DevStack, body: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOLKIT_", "PROMETHEUS_"))}
    env.update(stack.env())
    script = textwrap.dedent(
        """
        import asyncio, logging, sys
        import structlog
        import poolkit, poolkit.log

        async def slow(name):
            pool = await poolkit.create_pool(name=name, slow_query_seconds=0.05, pool_mode="transaction")
            await pool.fetch("select pg_sleep($1), $2::text", 0.1, "SECRET-PARAM-123")
            await pool.close()
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_poolkit_leaves_logging_and_structlog_configuration_to_the_app(stack: DevStack) -> None:
    proc = run_script(
        stack,
        """
        asyncio.run(slow("before-config"))
        print("structlog configured:", structlog.is_configured(), flush=True)
        logging.basicConfig(stream=sys.stdout, format="APP %(name)s %(message)s")
        asyncio.run(slow("after-config"))
        """,
    )
    assert proc.returncode == 0, proc.stderr
    # With no logging configured at all, poolkit's line still reaches stderr (once).
    before = [line for line in proc.stderr.splitlines() if "before-config" in line]
    assert len(before) == 1
    assert json.loads(before[0])["event"] == "slow_query"
    assert "structlog configured: False" in proc.stdout
    # Once the app configures logging, the line goes through the app's handler only (not twice).
    after_out = [line for line in proc.stdout.splitlines() if "after-config" in line]
    assert len(after_out) == 1
    assert after_out[0].startswith("APP poolkit.pool {")
    assert not [line for line in proc.stderr.splitlines() if "after-config" in line]
    assert "SECRET-PARAM-123" not in proc.stdout + proc.stderr


def test_configure_globally_renders_app_and_poolkit_events_alike(stack: DevStack) -> None:
    proc = run_script(
        stack,
        """
        poolkit.log.configure_globally(file=sys.stdout)
        structlog.contextvars.bind_contextvars(request_id="req-77")
        structlog.get_logger("app").info("handled", path="/x")
        asyncio.run(slow("global"))
        """,
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_name = {e["event"]: e for e in events}
    assert by_name["handled"]["request_id"] == "req-77"
    slow = by_name["slow_query"]
    assert slow["request_id"] == "req-77"  # the app's context reaches poolkit's event
    assert slow["pool"] == "global"
    assert slow["logger"] == "poolkit.pool"
    assert slow["sql"] == "select pg_sleep($1), $2::text"
    assert "SECRET-PARAM-123" not in proc.stdout + proc.stderr
