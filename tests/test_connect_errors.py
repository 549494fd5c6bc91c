"""A refused password, as a user meets it: one clear error, the right hint for the host, nothing twice on stderr."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import psycopg
import pytest

import poolkit
from poolkit import AuthenticationFailed
from poolkit.core.dsn import Dsn
from poolkit.core.translate import is_supabase_host, translate_connect_error
from poolkit.dev.devstack import DevStack


def wrong_password(url: str) -> str:
    return dataclasses.replace(Dsn.parse(url), password="not-the-password").to_url()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_refused_password_off_supabase_gets_a_generic_hint(stack: DevStack, driver: str) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        await poolkit.create_pool(
            driver=driver, pooled_url=wrong_password(stack.direct_url), sslrootcert=str(stack.ca_file)
        )
    message = str(info.value)
    assert f"127.0.0.1:{stack.pg_port} rejected the password for user 'app'" in message
    assert "ALTER ROLE" in message
    assert "Supabase" not in message


def test_a_refused_password_on_a_supabase_host_points_at_the_dashboard(stack: DevStack) -> None:
    # The server's own refusal, explained for the host the URL named.
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(wrong_password(stack.direct_url), sslrootcert=str(stack.ca_file))
    for host in ("aws-0-eu-central-1.pooler.supabase.com", "db.abcdefghij.supabase.co"):
        error = translate_connect_error(
            refused.value, Dsn.parse(f"postgresql://postgres.ref:x@{host}:6543/postgres"), connect_timeout=10
        )
        assert isinstance(error, AuthenticationFailed)
        assert "reset it in the Supabase dashboard" in str(error)
    generic = translate_connect_error(refused.value, Dsn.parse(stack.direct_url), connect_timeout=10)
    assert "Supabase" not in str(generic)
    assert [is_supabase_host(h) for h in ("supabase.com", "x.supabase.co", "notsupabase.com", "supabase.co.evil")] == [
        True,
        True,
        False,
        False,
    ]


# Each pool kind with a refused password; then a plain psycopg_pool (not poolkit's) with the same one.
SCRIPT = """
import asyncio, sys, traceback
import psycopg_pool
import poolkit

url, ca = sys.argv[1], sys.argv[2]

def report(kind, exc):
    text = "".join(traceback.format_exception(exc))
    chained = "During handling" in text or "direct cause" in text
    print(kind, type(exc).__name__, "chained" if chained else "alone", "PoolTimeout" in text)

for driver in ("asyncpg", "psycopg"):
    try:
        asyncio.run(poolkit.create_pool(driver=driver, pooled_url=url, sslrootcert=ca))
    except Exception as exc:
        report(driver, exc)
try:
    poolkit.create_sync_pool(pooled_url=url, sslrootcert=ca)
except Exception as exc:
    report("sync", exc)
raw = psycopg_pool.ConnectionPool(url, kwargs={"sslrootcert": ca}, min_size=1, name="raw", open=False)
try:
    raw.open(wait=True, timeout=1.0)
except psycopg_pool.PoolTimeout:
    print("raw timed out")
raw.close()
"""


def test_a_refused_password_is_one_error_without_psycopg_pools_echo(stack: DevStack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, wrong_password(stack.direct_url), str(stack.ca_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = proc.stdout.splitlines()
    # Each: AuthenticationFailed, no chained exception, no PoolTimeout anywhere in its traceback.
    assert lines[:3] == [
        "asyncpg AuthenticationFailed alone False",
        "psycopg AuthenticationFailed alone False",
        "sync AuthenticationFailed alone False",
    ], proc.stdout + proc.stderr
    assert lines[3] == "raw timed out"
    # psycopg_pool still logs its own pools' failures; poolkit's, which the caller already has, it does not.
    assert "error connecting in 'raw'" in proc.stderr, proc.stderr
    assert "error connecting in 'default'" not in proc.stderr, proc.stderr
