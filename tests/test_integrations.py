"""Framework fit: the FastAPI lifespan example under uvicorn, and the Django example through PgBouncer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from poolkit import ConfigError
from poolkit.dev.devstack import DevStack, free_port
from poolkit.integrations.django import databases

REPO = Path(__file__).resolve().parents[1]


def bouncer_clients(stack: DevStack, application_name: str) -> int:
    assert stack.pgbouncer is not None
    return sum(1 for c in stack.pgbouncer.admin("SHOW CLIENTS") if c.get("application_name") == application_name)


def test_fastapi_example_opens_serves_and_drains(stack_env: DevStack) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app", "--port", str(port), "--log-level", "info"],
        cwd=REPO,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{base}/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        alice = httpx.get(f"{base}/whoami", headers={"x-user-id": "alice"}, timeout=10).json()
        anonymous = httpx.get(f"{base}/whoami", timeout=10).json()
        # The startup opened a connection through the pooler and it stays in the pool between requests.
        held = bouncer_clients(stack_env, "fastapi-example")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        output = proc.stdout.read() if proc.stdout else ""
    assert health.json() == {"db": 1, "mode": "transaction"}
    assert alice == {"db_user": "app", "sub": "alice"}
    assert anonymous == {"db_user": "app", "sub": None}, "the claims did not outlive alice's request"
    assert held >= 1
    # uvicorn re-raises SIGTERM after its graceful shutdown; the lifespan's shutdown half ran first.
    assert code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert bouncer_clients(stack_env, "fastapi-example") == 0, "shutdown drained and closed the pool"


def test_fastapi_lifespan_fails_fast_on_a_bad_url(stack_env: DevStack) -> None:
    env = {**os.environ, "POOLKIT_POOLED_URL": stack_env.url(via="pgbouncer", password="wrong", pgbouncer="true")}
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app", "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "rejected the password" in done.stderr + done.stdout
    assert "wrong" not in (done.stderr + done.stdout).replace("wrong password", "")


def manage(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "examples" / "django_app"), str(REPO)])}
    return subprocess.run(
        [sys.executable, "manage.py", *argv],
        cwd=REPO / "examples" / "django_app",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_django_example_migrates_direct_and_serves_pooled(stack_env: DevStack, monkeypatch: pytest.MonkeyPatch) -> None:
    # A PgBouncer of its own: the shared one's server connections carry prepared statements that other tests'
    # raw-driver demonstrations left there on purpose, and this test counts them.
    bouncer = stack_env.start_pgbouncer()
    monkeypatch.setenv("POOLKIT_POOLED_URL", bouncer.url(pgbouncer="true"))
    stack_env.psql("DROP TABLE IF EXISTS poolkit_example_note; DROP TABLE IF EXISTS django_migrations CASCADE")
    checked = manage("check", "--database", "default")
    assert checked.returncode == 0, checked.stderr
    migrated = manage("migrate", "--database", "direct", "--no-input")
    assert migrated.returncode == 0, migrated.stderr
    assert stack_env.psql("SELECT to_regclass('poolkit_example_note') IS NOT NULL").strip() == "t"
    demo = manage("notes_demo")
    assert demo.returncode == 0, demo.stderr
    out = json.loads(demo.stdout)
    assert out["bodies"] == [f"note {i}" for i in range(5)]
    assert out["pooled"] is True
    assert out["server_side_cursors"] is False
    assert out["prepared_statements"] == 0
    assert out["port"] == str(bouncer.port)


def test_django_settings_follow_the_detected_mode(stack_env: DevStack) -> None:
    cfg = databases(max_size=3, acquire_timeout=5)
    default, direct = cfg["default"], cfg["direct"]
    assert default["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert default["OPTIONS"]["prepare_threshold"] is None
    assert default["OPTIONS"]["pool"] == {
        "min_size": 0,
        "max_size": 3,
        "timeout": 5.0,
        "max_idle": 20.0,
        "max_lifetime": 1800.0,
    }
    assert default["OPTIONS"]["sslmode"] == "require"
    assert "pgbouncer" not in default["OPTIONS"], "tool-only URL parameters never reach libpq"
    assert default["CONN_MAX_AGE"] == 0
    assert direct["PORT"] == str(stack_env.pg_port)
    assert "pool" not in direct["OPTIONS"] and direct["DISABLE_SERVER_SIDE_CURSORS"] is False
    assert direct["TEST"] == {"MIRROR": "default"}
    # A direct-only configuration: server-side cursors and prepared statements are fine, no extra alias.
    only_direct = databases(pooled_url=stack_env.direct_url, direct_url=None)
    assert set(only_direct) == {"default"}
    assert only_direct["default"]["DISABLE_SERVER_SIDE_CURSORS"] is False
    assert "prepare_threshold" not in only_direct["default"]["OPTIONS"]
    with pytest.raises(ConfigError, match="max_size"):
        databases(max_size=50)
