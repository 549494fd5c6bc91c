"""Settings as a user meets them in a real process's environment: misspelt names, TLS values, clean errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from poolkit import ConfigError
from poolkit.core.settings import DIRECT_URL_ENV, POOLED_URL_ENV, check_env
from poolkit.dev.devstack import DevStack
from poolkit.sidecar.policy.config import SidecarSettings, check_sidecar_env

README = Path(__file__).resolve().parent.parent / "README.md"
REMOTE = "postgresql://app:pw-remote@db.example.com:6543/postgres"

# Opens a pool the way an app does and prints its repr; an error ends the process with its traceback.
OPEN_POOL = (
    "import asyncio, poolkit\n"
    "async def main():\n"
    "    pool = await poolkit.create_pool()\n"
    "    print(repr(pool))\n"
    "    await pool.close()\n"
    "asyncio.run(main())\n"
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything poolkit reads, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (*POOLED_URL_ENV, *DIRECT_URL_ENV) and not k.upper().startswith("POOLKIT_")
    }
    return {**env, **extra}


def run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )


# ---------------------------------------------------------------- misspelt variables


@pytest.mark.parametrize(
    ("name", "value", "meant"),
    [
        ("POOLKIT_MAXSIZE", "5", "POOLKIT_MAX_SIZE"),
        ("POOLKIT_MAX_SZIE", "2", "POOLKIT_MAX_SIZE"),
        ("poolkit_max_szie", "2", "POOLKIT_MAX_SIZE"),  # pydantic-settings reads names case-insensitively
        ("POOLKIT_ACQUIRE_TIMOUT", "3", "POOLKIT_ACQUIRE_TIMEOUT"),
    ],
)
def test_a_misspelt_variable_stops_the_app_and_names_the_setting(
    stack: DevStack, name: str, value: str, meant: str
) -> None:
    env = clean_env(**stack.env())
    # Spelt right, the same environment opens a pool: the failure below is the typo alone.
    assert "max=1" in run(OPEN_POOL, env).stdout
    failed = run(OPEN_POOL, {**env, name: value})
    assert failed.returncode == 1
    assert f"{name} is not a poolkit setting (did you mean {meant}?)" in failed.stderr, failed.stderr
    assert "poolkit.errors.ConfigError" in failed.stderr


def test_a_misspelt_pooled_url_does_not_send_the_app_to_the_direct_url(stack: DevStack) -> None:
    env = clean_env(**stack.env())
    pooled = env.pop("POOLKIT_POOLED_URL")
    typo = run(OPEN_POOL, {**env, "POOLKIT_POOLED_ULR": pooled})
    assert typo.returncode == 1
    assert "POOLKIT_POOLED_ULR is not a poolkit setting (did you mean POOLKIT_POOLED_URL?)" in typo.stderr
    # `poolkit check` says the same, as its settings row.
    check = subprocess.run(
        [sys.executable, "-m", "poolkit", "check"],
        env={**env, "POOLKIT_POOLED_ULR": pooled},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 1
    assert "did you mean POOLKIT_POOLED_URL?" in check.stdout, check.stdout
    # Without a pooled URL at all the pool refuses to go direct on its own ...
    unset = run(OPEN_POOL, env)
    assert unset.returncode == 1
    assert "no pooled URL is configured" in unset.stderr and "POOLKIT_POOL_MODE=direct" in unset.stderr
    # ... goes direct when told to ...
    told = run(OPEN_POOL, {**env, "POOLKIT_POOL_MODE": "direct"})
    assert told.returncode == 0, told.stderr
    assert "<Pool default pooled asyncpg mode=direct max=1" in told.stdout
    # ... and with the name spelt right it goes through the pooler.
    right = run(OPEN_POOL, {**env, "POOLKIT_POOLED_URL": pooled})
    assert "<Pool default pooled asyncpg mode=transaction max=1" in right.stdout, right.stderr
    assert str(stack.pgbouncer_port) in pooled and str(stack.pg_port) not in pooled


def test_the_sidecars_misspelt_variable_is_refused_at_start() -> None:
    env = clean_env(POOLKIT_DIRECT_URL="postgresql://app:pw@127.0.0.1:5432/app?sslmode=disable")
    proc = subprocess.run(
        [sys.executable, "-m", "poolkit", "sidecar", "--listen-port", "0", "--http-port", "0"],
        env={**env, "POOLKIT_SIDECAR_MAXSIZE": "50"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "POOLKIT_SIDECAR_MAXSIZE is not a poolkit setting (did you mean POOLKIT_SIDECAR_MAX_SIZE?)" in proc.stderr
    # The library does not judge the sidecar's variables, and the sidecar judges the library's URL names.
    check_env({"POOLKIT_SIDECAR_MAXSIZE": "50"})
    with pytest.raises(ConfigError, match=r"POOLKIT_POOLED_ULR .*did you mean POOLKIT_POOLED_URL\?"):
        check_sidecar_env({"POOLKIT_POOLED_ULR": "x"})


def test_known_names_come_from_the_models_and_the_readme() -> None:
    # Every field of the sidecar's model is known, whatever fields it grows.
    check_sidecar_env({f"POOLKIT_SIDECAR_{field.upper()}": "x" for field in SidecarSettings.model_fields})
    # Every POOLKIT_* name the README mentions is accepted by the check that reads it.
    # The README's examples of misspellings are refused; every other POOLKIT_* name it mentions is accepted.
    misspelt = {"POOLKIT_MAXSIZE", "POOLKIT_POOLED_ULR", "POOLKIT_SIDECAR_MAXSIZE"}
    for name in misspelt:
        with pytest.raises(ConfigError, match=f"{name} is not a poolkit setting"):
            check_sidecar_env({name: "x"})
    documented = set(re.findall(r"\bPOOLKIT_[A-Z0-9_]*[A-Z0-9]\b", README.read_text())) - misspelt
    library = {name for name in documented if not name.startswith("POOLKIT_SIDECAR_")}
    sidecar = documented - library
    assert {"POOLKIT_MAX_SIZE", "POOLKIT_PG_BINDIR", "POOLKIT_MAX_WAITING"} <= library
    for name in sorted(library):
        check_env({name: "x"})
    for name in sorted(sidecar):
        check_sidecar_env({name: "x"})


# ---------------------------------------------------------------- TLS values and clean errors


@pytest.mark.parametrize("mode", ["prefer", "allow"])
def test_sslmode_in_a_variable_is_explained_as_in_the_url(mode: str) -> None:
    from_url = run(
        "import poolkit; poolkit.load_settings()",
        clean_env(POOLKIT_POOLED_URL=f"{REMOTE}?sslmode={mode}"),
    )
    from_var = run(
        "import poolkit; poolkit.load_settings()",
        clean_env(POOLKIT_POOLED_URL=REMOTE, POOLKIT_SSLMODE=mode),
    )
    explanation = f"has sslmode={mode}, which silently falls back to plain text. Use sslmode=require"
    assert f"POOLKIT_POOLED_URL (pooled_url): {explanation}" in from_url.stderr, from_url.stderr
    assert f"POOLKIT_SSLMODE (sslmode): {explanation}" in from_var.stderr, from_var.stderr
    assert "Input should be" not in from_var.stderr


def test_an_empty_sslrootcert_says_it_is_empty() -> None:
    proc = run("import poolkit; poolkit.load_settings()", clean_env(POOLKIT_POOLED_URL=REMOTE, POOLKIT_SSLROOTCERT=""))
    assert "POOLKIT_SSLROOTCERT (sslrootcert): is set but empty" in proc.stderr, proc.stderr
    assert "no such file" not in proc.stderr


@pytest.mark.parametrize(
    "env",
    [
        {"POOLKIT_SSLMODE": "prefer"},
        {"POOLKIT_MAX_SIZE": "lots"},
        {"POOLKIT_MAX_SIZE": "9"},
        {"POOLKIT_SSLROOTCERT": "/nonexistent/ca.pem"},
        {"POOLKIT_POOLED_URL": "mysql://u:pw@h/db"},
    ],
)
def test_config_errors_carry_no_pydantic_text(env: dict[str, str]) -> None:
    proc = run("import poolkit; poolkit.load_settings()", clean_env(POOLKIT_POOLED_URL=REMOTE) | env)
    assert proc.returncode == 1
    assert "poolkit.errors.ConfigError: invalid poolkit settings" in proc.stderr or "ConfigError" in proc.stderr
    for pydantic_text in ("errors.pydantic.dev", "For further information", "ValidationError", "During handling"):
        assert pydantic_text not in proc.stderr, proc.stderr
