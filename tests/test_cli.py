"""The ``poolkit`` command as a user runs it: ``demo``, ``dev`` and ``health``, in real subprocesses."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import psycopg
import pytest

from poolkit.core.settings import DIRECT_URL_ENV, POOLED_URL_ENV


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*POOLED_URL_ENV, *DIRECT_URL_ENV)}
    return {k: v for k, v in env.items() if not k.startswith("POOLKIT_")}


def test_demo_on_a_machine_with_no_database_configured() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "poolkit", "demo", "--queries", "400"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "starting the local stack" in out
    for driver in ("asyncpg", "psycopg"):
        assert f"[{driver}] detected transaction" in out
        assert f"[{driver}] 400 statements from 20 concurrent tasks" in out
    assert "[sidecar] 400 statements from 20 tasks through the sidecar" in out
    assert out.count(", 0 errors") == 3
    assert "/metrics" in out
    assert ":***@" in out  # the URL it shows is redacted


def test_dev_prints_working_urls_and_stops_cleanly() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolkit", "dev"],
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        exports: dict[str, str] = {}
        assert proc.stdout is not None
        while len(exports) < 3:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            if line.startswith("export "):
                name, _, value = line[len("export ") :].strip().partition("=")
                exports[name] = value.strip("'")
        assert set(exports) == {"POOLKIT_POOLED_URL", "POOLKIT_DIRECT_URL", "POOLKIT_SSLROOTCERT"}
        for key in ("POOLKIT_POOLED_URL", "POOLKIT_DIRECT_URL"):
            assert "sslmode=verify-full" in exports[key]
            url = exports[key].replace("&pgbouncer=true", "")
            with psycopg.connect(url, sslrootcert=exports["POOLKIT_SSLROOTCERT"], prepare_threshold=None) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        # `poolkit check` approves of what `poolkit dev` exports: both servers' certificates verified.
        check = _check({**_clean_env(), **exports})
        assert check.count("certificate verified (verify-full)") == 2, check
        assert "NOT verified" not in check and "set sslmode=verify-full" not in check
        # The exports before: sslmode=require with the CA file beside it, which check warns about.
        required = {k: v.replace("sslmode=verify-full", "sslmode=require") for k, v in exports.items()}
        assert _check({**_clean_env(), **required}).count("set sslmode=verify-full and POOLKIT_SSLROOTCERT") == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def _check(env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "poolkit", "check"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert "FAIL" not in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def health_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/readyz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_health_command_exit_codes(health_server: int) -> None:
    def health(path: str) -> int:
        url = f"http://127.0.0.1:{health_server}{path}"
        return subprocess.run([sys.executable, "-m", "poolkit", "health", "--url", url], check=False).returncode

    assert health("/readyz") == 0
    assert health("/broken") == 1
    url = "http://probe:Hunter2@127.0.0.1:1/readyz"  # nothing listens on port 1
    cmd = [sys.executable, "-m", "poolkit", "health", "--url", url, "--timeout", "1"]
    down = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert down.returncode == 1
    assert "127.0.0.1:1/readyz" in down.stderr
    assert "Hunter2" not in down.stderr + down.stdout


def test_sidecar_reads_its_config_file_from_the_environment(tmp_path: os.PathLike[str]) -> None:
    config = os.path.join(tmp_path, "sidecar.toml")
    with open(config, "w") as fh:
        fh.write('max_size = "three"\n')
    env = {**_clean_env(), "POOLKIT_SIDECAR_CONFIG": config, "POOLKIT_DIRECT_URL": "postgresql://app@127.0.0.1/app"}
    proc = subprocess.run(
        [sys.executable, "-m", "poolkit", "sidecar"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0
    # The file's bad value is reported, so the file named by the environment was read.
    assert "max_size" in proc.stderr and config in proc.stderr, proc.stderr
