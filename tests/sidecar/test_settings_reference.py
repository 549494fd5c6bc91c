"""The README's sidecar settings reference is complete and true; `poolkit health` reads the sidecar's settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from poolkit.dev.devstack import DevStack, free_port
from poolkit.sidecar.policy.config import RELOADABLE, SidecarSettings, _env_names, load_sidecar_settings

from .conftest import REPO, SidecarProcess

README = (REPO / "README.md").read_text()


def reference_section() -> str:
    start = README.index("### Settings reference")
    return README[start : README.index("\n## ", start)]


def example_toml() -> str:
    [block] = re.findall(r"```toml\n(.*?)```", reference_section(), re.DOTALL)
    return block


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_") and k != "DATABASE_URL"}


def test_the_table_lists_every_setting_with_its_env_names_and_reloadability() -> None:
    rows = {}
    for line in reference_section().splitlines():
        match = re.match(r"\| `(\w+)` \| (.+?) \| (.+?) \| (yes|no) \|", line)
        if match:
            rows[match.group(1)] = (re.findall(r"`(\w+)`", match.group(2)), match.group(4))
    assert set(rows) == set(SidecarSettings.model_fields)
    for name, (env, reloads) in rows.items():
        assert tuple(env) == _env_names(name), name
        assert reloads == ("yes" if name in RELOADABLE else "no"), name


def test_the_example_file_is_complete_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("POOLKIT_") or name in ("DATABASE_URL", "DIRECT_DATABASE_URL"):
            monkeypatch.delenv(name)
    text = example_toml().replace("/etc/poolkit/", f"{tmp_path}/")
    for name in ("ca.pem", "server.crt", "server.key"):
        (tmp_path / name).write_text("placeholder\n")  # the loader checks that the files exist
    (tmp_path / "userlist.txt").write_text('"app" "secret"\n')
    config = tmp_path / "sidecar.toml"
    config.write_text(text)
    assert set(tomllib.loads(text)) == set(SidecarSettings.model_fields), "the example lacks a setting"
    settings = load_sidecar_settings(config)
    assert settings.admin_users == ["ops"]
    assert settings.stats_users == ["grafana", "oncall"]
    assert settings.max_pinned_clients == 2
    assert settings.effective_auth_type == "scram-sha-256"
    assert settings.route == "pooled" and settings.direct_route_enabled
    assert sorted(settings.users) == ["app", "ops"]


def test_sidecar_help_says_where_the_settings_are() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "poolkit", "sidecar", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
    )
    assert done.returncode == 0
    assert "Settings reference" in done.stdout and "README.md" in done.stdout


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "poolkit", "health", "--timeout", "5", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_health_reads_the_sidecars_settings(
    sidecar_process: Callable[..., SidecarProcess], stack: DevStack, tmp_path: Path
) -> None:
    process = sidecar_process()  # its /readyz is on a free port, not 9930
    env = {**clean_env(), "POOLKIT_DIRECT_URL": stack.url(via="direct", sslmode="verify-full")}
    env["POOLKIT_SSLROOTCERT"] = str(stack.ca_file)
    from_env = health({**env, "POOLKIT_SIDECAR_HTTP_PORT": str(process.http_port)})
    assert (from_env.returncode, from_env.stdout.strip()) == (0, "ok"), from_env.stderr
    config = tmp_path / "sidecar.toml"
    config.write_text(f'http_host = "0.0.0.0"\nhttp_port = {process.http_port}\n')
    assert health(env, "--config", str(config)).returncode == 0
    assert health({**env, "POOLKIT_SIDECAR_CONFIG": str(config)}).returncode == 0
    nobody = free_port()
    down = health({**env, "POOLKIT_SIDECAR_HTTP_PORT": str(nobody)})
    assert down.returncode == 1
    assert f"127.0.0.1:{nobody}/readyz" in down.stderr
    assert stack.app_password not in down.stderr + down.stdout
    off = health({**env, "POOLKIT_SIDECAR_HTTP_ENABLED": "false"})
    assert off.returncode == 1 and "http_enabled is false" in off.stderr
