"""``poolkit check`` against the local stack: healthy, wrong password, TLS mismatch, full server, poolers."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme

from poolkit.dev.check import add_arguments, run
from poolkit.dev.devstack import DevStack

REPO = Path(__file__).resolve().parents[1]


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = run(parser.parse_args([*argv, "--json"]))
    return code, json.loads(capsys.readouterr().out)


def find(results: list[dict[str, Any]], target: str, name: str) -> dict[str, Any]:
    matches = [r for r in results if r["target"] == target and r["check"] == name]
    assert matches, f"no {target}/{name} in {[(r['target'], r['check']) for r in results]}"
    return matches[0]


def test_healthy_stack(stack_env: DevStack, capsys: pytest.CaptureFixture[str]) -> None:
    code, results = check(capsys, "--instances", "10")
    assert code == 0, [r for r in results if r["status"] == "fail"]
    assert find(results, "pooled", "behind")["data"]["mode"] == "transaction"
    assert find(results, "direct", "behind")["data"]["mode"] == "direct"
    assert find(results, "pooled", "prepared statements")["status"] == "ok"
    assert find(results, "pooled", "dns")["data"]["ipv4"] == ["127.0.0.1"]
    assert find(results, "direct", "server")["detail"].startswith("PostgreSQL 15")
    conns = find(results, "direct", "connections")["data"]
    assert conns["max_connections"] == 60 and conns["reserved"] == 3 and conns["in_use"] >= 1
    assert find(results, "direct", "latency")["data"]["median_ms"] > 0
    assert find(results, "settings", "budget")["status"] == "ok"
    # The URLs carry sslmode=require: encrypted, not verified, and the doctor says so.
    assert find(results, "direct", "tls")["status"] == "warn"
    assert "verify-full" in find(results, "direct", "tls")["fix"]


def test_verified_tls_and_the_readable_table(stack_env: DevStack, capsys: pytest.CaptureFixture[str]) -> None:
    url = stack_env.url(via="direct", sslmode="verify-full", sslrootcert=str(stack_env.ca_file))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = run(parser.parse_args(["--pooled-url", url, "--direct-url", url]))
    out = capsys.readouterr().out
    assert code == 0
    assert "certificate verified (verify-full)" in out
    assert "STATUS" in out and "DETAIL" in out and "0 failing" in out
    assert stack_env.app_password not in out


def test_wrong_password(stack_env: DevStack, capsys: pytest.CaptureFixture[str]) -> None:
    url = stack_env.url(via="direct", password="not-the-password")
    code, results = check(capsys, "--pooled-url", url, "--direct-url", url)
    auth = find(results, "pooled", "auth")
    assert code == 1
    assert auth["status"] == "fail" and auth["data"]["reason"] == "auth"
    assert "rejected the password" in auth["fix"]
    assert "not-the-password" not in json.dumps(results)
    # DNS, TCP and TLS passed: the report points at the password, not the network.
    assert [find(results, "pooled", c)["status"] for c in ("dns", "tcp")] == ["ok", "ok"]


def test_tls_verification_with_the_wrong_ca(
    stack_env: DevStack, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POOLKIT_SSLROOTCERT")  # it would win over the URL's sslrootcert, as it does for pools
    wrong_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    url = stack_env.url(via="direct", sslmode="verify-full", sslrootcert=str(wrong_ca))
    code, results = check(capsys, "--pooled-url", url, "--direct-url", url)
    tls = find(results, "pooled", "tls")
    assert code == 1
    assert tls["status"] == "fail"
    assert "certificate verify failed" in tls["fix"] and "POOLKIT_SSLROOTCERT" in tls["fix"]
    assert find(results, "pooled", "auth")["status"] == "fail"


@pytest.fixture
def small_stack() -> Iterator[DevStack]:
    """A server of its own with max_connections=10 (7 for non-superusers), so it can be filled."""
    with DevStack(max_connections=10) as started:
        yield started


def test_full_server(
    small_stack: DevStack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("POOLKIT_POOLED_URL", "POOLKIT_DIRECT_URL", "DATABASE_URL", "POOLKIT_SSLROOTCERT"):
        monkeypatch.delenv(name, raising=False)
    url = small_stack.direct_url
    fillers = []
    try:
        while True:
            try:
                fillers.append(psycopg.connect(url))
            except psycopg.OperationalError:
                break
        code, results = check(capsys, "--pooled-url", url)
    finally:
        for conn in fillers:
            conn.close()
    auth = find(results, "pooled", "auth")
    assert len(fillers) == 7
    assert code == 1
    assert auth["data"]["reason"] == "too_many_connections"
    assert "transaction pooler" in auth["fix"] and "POOLKIT_MAX_SIZE" in auth["fix"]


def test_budget_over_the_server_limit(stack_env: DevStack, capsys: pytest.CaptureFixture[str]) -> None:
    direct = stack_env.direct_url
    code, results = check(capsys, "--pooled-url", direct, "--instances", "40", "--max-size", "3")
    budget = find(results, "settings", "budget")
    assert code == 1
    assert budget["status"] == "fail"
    assert budget["data"] == {"instances": 40, "max_size": 3, "wanted": 120, "capacity": 57}
    assert "POOLKIT_MAX_SIZE=1" in budget["fix"]
    # Through the transaction pooler the same fleet is fine: the server sees only the pooler's pool.
    code, results = check(capsys, "--instances", "40", "--max-size", "3")
    assert find(results, "settings", "budget")["status"] == "ok"
    code, results = check(capsys, "--pooled-url", direct, "--instances", "100", "--max-size", "3")
    assert "cannot each hold a direct connection" in find(results, "settings", "budget")["fix"]


def test_pooler_detection_by_behaviour(stack_env: DevStack, capsys: pytest.CaptureFixture[str]) -> None:
    session = stack_env.start_pgbouncer(pool_mode="session", pool_size=2)
    try:
        # The stack's PgBouncer without the pgbouncer=true marker: poolkit's URL rules see "direct",
        # the behaviour says transaction pooler, and the doctor fails with the fix.
        unmarked = stack_env.pooled_url
        code, results = check(capsys, "--pooled-url", unmarked)
        assert find(results, "pooled", "behind")["data"]["mode"] == "transaction"
        prepared = find(results, "pooled", "prepared statements")
        assert code == 1 and prepared["status"] == "fail"
        assert "POOLKIT_POOL_MODE=transaction" in prepared["fix"]

        code, results = check(capsys, "--pooled-url", session.url())
        assert find(results, "pooled", "behind")["data"]["mode"] == "session"
        assert find(results, "pooled", "prepared statements")["status"] == "ok"

        # A session pooler with its only server connection held by the first client: the second waits.
        single = stack_env.start_pgbouncer(pool_mode="session", pool_size=1)
        try:
            code, results = check(capsys, "--pooled-url", single.url(), "--probe-timeout", "1")
        finally:
            single.stop()
        assert find(results, "pooled", "behind")["data"]["mode"] == "session"
        assert "waited" in find(results, "pooled", "behind")["detail"]

        code, results = check(capsys, "--pooled-url", stack_env.direct_url)
        assert find(results, "pooled", "behind")["data"]["mode"] == "direct"
        assert find(results, "pooled", "pooler")["status"] == "warn"

        # A direct URL that is really a transaction pooler breaks migrations: fail.
        code, results = check(capsys, "--direct-url", unmarked)
        assert code == 1
        assert find(results, "direct", "prepared statements")["status"] == "fail"
    finally:
        session.stop()


def test_bad_settings_and_the_module_entry_point(stack_env: DevStack) -> None:
    env = {**os.environ, "POOLKIT_POOLED_URL": "mysql://nope"}
    done = subprocess.run(
        [sys.executable, "-m", "poolkit.dev.check"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "scheme 'mysql'" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "poolkit.dev.check", "--json"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert {r["check"] for r in json.loads(done.stdout)} >= {"dns", "tcp", "tls", "auth", "behind", "budget"}
