"""Every invalid setting value gives an error naming the setting and how to fix it, and never echoes a password.

Table-driven over every field of :class:`poolkit.core.settings.Settings` (env and keyword) and of
:class:`poolkit.sidecar.policy.config.SidecarSettings` (env, TOML config file and flag). tests/test_settings.py
checks precedence and a first set of messages; this table adds the remaining fields and values (NaN,
infinity, negative, wrong types, URL shapes) and a guard: a new field without an invalid-value case here
fails the suite. Each URL in the table carries the same password, and no message may contain it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from poolkit import ConfigError, Settings, load_settings
from poolkit.core.settings import DIRECT_URL_ENV, POOLED_URL_ENV
from poolkit.errors import SidecarError
from poolkit.sidecar.policy.config import SidecarSettings, load_sidecar_settings
from poolkit.sidecar.service.app import Sidecar

SECRET = "Pw-Not-In-Any-Message-7713"
REMOTE = f"postgresql://app:{SECRET}@db.example.com:6543/postgres"
LOOPBACK = f"postgresql://app:{SECRET}@127.0.0.1:6432/app?sslmode=disable"
URL_SHAPE = "postgresql://user:password@host:port/db"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*POOLED_URL_ENV, *DIRECT_URL_ENV, "POOLKIT_SSLROOTCERT"):
        monkeypatch.delenv(name, raising=False)
    for field in Settings.model_fields:
        monkeypatch.delenv(f"POOLKIT_{field.upper()}", raising=False)
    for field in SidecarSettings.model_fields:
        monkeypatch.delenv(f"POOLKIT_SIDECAR_{field.upper()}", raising=False)


def assert_clear(message: str, fragments: list[str]) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert SECRET not in message, message


# ---------------------------------------------------------------- library Settings


@dataclass(frozen=True)
class Case:
    field: str
    value: str  # as an environment variable would hold it
    fragments: tuple[str, ...]  # besides the setting's names: what the message must say (how to fix it)
    env: str = ""  # the variable to set; default POOLKIT_<FIELD>

    @property
    def env_name(self) -> str:
        return self.env or f"POOLKIT_{self.field.upper()}"

    def __str__(self) -> str:
        return f"{self.env_name}={self.value.replace(SECRET, '***')[:40]}"


LIBRARY = [
    Case("pooled_url", f"postgresql://app:{SECRET}@[::1/postgres", (URL_SHAPE,)),  # urlsplit: "Invalid IPv6 URL"
    Case("pooled_url", f"postgresql://app:{SECRET}@db.example.com:0/postgres", ("port", "1 to 65535"), "DATABASE_URL"),
    Case(
        "pooled_url",
        f"{REMOTE}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ("sslrootcert=/nonexistent/ca.pem", "not a file", "POOLKIT_SSLROOTCERT"),
        "POSTGRES_PRISMA_URL",
    ),
    Case("pooled_url", f"{REMOTE}?sslmode=verify-ca", ("sslmode=verify-ca", "POOLKIT_SSLROOTCERT")),
    Case("direct_url", f"{REMOTE}?sslmode=allow", ("sslmode=require",), "POSTGRES_URL_NON_POOLING"),
    Case("direct_url", f"postgresql://app:{SECRET}@:5432/postgres", ("no host",), "DIRECT_DATABASE_URL"),
    Case("direct_url", "   ", ("is empty", URL_SHAPE)),
    Case("pool_mode", "pgbouncer", ("'transaction'", "'session'")),
    Case("driver", "asyncpg2", ("'asyncpg'", "'psycopg'")),
    Case("profile", "lambda", ("'serverless'", "'server'")),
    Case("name", "x" * 65, ("1-64", "metric label")),
    Case("max_size", "-3", ("at least 1",)),
    Case("min_size", "-1", ("between 0 and max_size",)),
    Case("min_size", "one", ("integer",)),
    Case("idle_timeout", "nan", ("greater than 0",)),
    Case("connect_timeout", "inf", ("greater than 0",)),
    Case("acquire_timeout", "-0.5", ("greater than 0",)),
    Case("max_lifetime", "1e999", ("greater than 0",)),
    Case("sslmode", "prefer", ("sslmode=prefer", "falls back to plain text", "sslmode=require")),
    Case("sslmode", "maybe", ("'maybe'", "require", "verify-full")),
    Case("sslrootcert", "/", ("no such file", "PEM file")),
    Case("sslrootcert", "", ("is set but empty", "PEM file")),
    Case("max_waiting", "-1", ("0 (no limit)",)),
    Case("max_waiting", "some", ("integer",)),
    Case("application_name", "x" * 64, ("1-63 printable characters",)),
    Case("application_name", "tab\there", ("printable",)),
    Case("slow_query_seconds", "0", ("greater than 0",)),
    Case("env", "staging", ("'production'", "'development'")),
    Case("query_log", "sometimes", ("boolean",)),
]


def test_every_library_setting_has_an_invalid_value_case() -> None:
    assert {case.field for case in LIBRARY} == set(Settings.model_fields), "add a case for the new setting"


@pytest.mark.parametrize("case", LIBRARY, ids=str)
def test_library_env_error_names_the_variable_and_the_fix(monkeypatch: pytest.MonkeyPatch, case: Case) -> None:
    if case.field != "pooled_url":
        monkeypatch.setenv("POOLKIT_POOLED_URL", REMOTE)
    monkeypatch.setenv(case.env_name, case.value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    # A blank variable counts as unset when labelling, so the message names the field and its variable.
    names = [case.field, case.env_name] if case.value.strip() else [case.field, f"POOLKIT_{case.field.upper()}"]
    assert_clear(str(info.value), [*names, *case.fragments])
    assert SECRET not in repr(info.value)
    assert info.value.__cause__ is None


@pytest.mark.parametrize("case", LIBRARY, ids=str)
def test_library_keyword_error_names_the_keyword(case: Case) -> None:
    value: Any = case.value
    if case.field in ("max_size", "min_size") and case.value.lstrip("-").isdigit():
        value = int(case.value)
    if case.field == "sslrootcert" and case.value:  # Path("") would be ".", a directory: "" stays a string
        value = Path(case.value)
    base = {} if case.field == "pooled_url" else {"pooled_url": REMOTE}
    with pytest.raises(ConfigError) as info:
        load_settings(**base, **{case.field: value})
    assert_clear(str(info.value), [f"{case.field} (keyword argument)", *case.fragments])


# ---------------------------------------------------------------- sidecar settings


@dataclass(frozen=True)
class SidecarCase:
    field: str
    value: Any  # the Python/TOML value; the environment gets json.dumps for dicts, str() otherwise
    fragments: tuple[str, ...]

    @property
    def env_value(self) -> str:
        return json.dumps(self.value) if isinstance(self.value, dict) else str(self.value)

    def __str__(self) -> str:
        return f"{self.field}={self.env_value.replace(SECRET, '***')[:40]}"


SIDECAR = [
    SidecarCase("listen_port", 65536, ("TCP port from 1 to 65535",)),
    SidecarCase("http_port", -1, ("TCP port from 1 to 65535",)),
    SidecarCase("http_enabled", "perhaps", ("boolean",)),
    SidecarCase("pooled_url", f"{REMOTE}?sslmode=prefer", ("sslmode=require",)),
    SidecarCase("direct_url", f"mysql://app:{SECRET}@db.example.com/postgres", ("scheme 'mysql'", URL_SHAPE)),
    SidecarCase("upstream", "replica", ("'pooled'", "'direct'")),
    SidecarCase("upstream_mode", "statement", ("'session'", "'transaction'")),
    SidecarCase("sslrootcert", "/nonexistent/ca.pem", ("no such file",)),
    SidecarCase("max_size", 0, ("at least 1",)),
    SidecarCase("max_client_conn", -5, ("at least 1",)),
    SidecarCase("direct_max_size", 0, ("at least 1",)),
    SidecarCase("max_pinned_clients", -1, ("0 or more",)),
    SidecarCase("query_wait_timeout", "inf", ("seconds, 0 or more",)),
    SidecarCase("idle_transaction_timeout", -1, ("seconds, 0 or more",)),
    SidecarCase("server_idle_timeout", "nan", ("seconds, 0 or more",)),
    SidecarCase("server_lifetime", "forever", ("number",)),
    SidecarCase("connect_timeout", -3, ("seconds, 0 or more",)),
    SidecarCase("client_login_timeout", "1e309", ("seconds, 0 or more",)),
    SidecarCase("shutdown_timeout", -1, ("seconds, 0 or more",)),
    SidecarCase("slow_query_seconds", -0.1, ("seconds, 0 or more",)),
    SidecarCase("max_message_size", 100, ("between 1024 and",)),
    SidecarCase("max_prepared_statements", -1, ("0 or more",)),
    SidecarCase("pipeline_depth", -1, ("between 0 and 1000",)),
    SidecarCase("query_timeout", -1, ("seconds, 0 or more",)),
    SidecarCase("server_check_delay", "inf", ("seconds, 0 or more",)),
    SidecarCase("server_check_timeout", 0, ("greater than 0",)),
    SidecarCase("server_login_retry", -2, ("seconds, 0 or more",)),
    SidecarCase("auth_type", "md5", ("'scram-sha-256'", "'trust'")),
    SidecarCase("users", {"": SECRET}, ("non-empty",)),
    SidecarCase("auth_file", "/nonexistent/userlist.txt", ("no such file",)),
    SidecarCase("client_tls", "verify", ("'require'",)),
    SidecarCase("admin_users", "x" * 64, ("1 to 63 bytes",)),
    SidecarCase("stats_users", "ops, " + "y" * 70, ("1 to 63 bytes",)),
    SidecarCase("user_pools", True, ("needs users with passwords",)),
    SidecarCase("tls_cert_file", "/nonexistent/cert.pem", ("no such file",)),
    SidecarCase("tls_key_file", "/nonexistent/key.pem", ("no such file",)),
]
# Free-form values only the operating system can judge: checked when the sidecar starts (below).
CHECKED_AT_START = {
    "listen_host": ("not a host!!", "cannot listen on not a host!!"),
    "unix_socket_dir": ("/nonexistent/dir", "cannot listen on Unix socket /nonexistent/dir"),
    "http_host": ("999.1.1.1", "cannot serve /metrics on 999.1.1.1"),
}
# Any string is valid: a label, the admin console's database name, the reset statement (empty: no reset).
FREE_FORM = {"pool_name", "application_name", "admin_database", "server_reset_query"}


def test_every_sidecar_setting_has_an_invalid_value_case() -> None:
    covered = {case.field for case in SIDECAR} | set(CHECKED_AT_START) | FREE_FORM
    assert covered == set(SidecarSettings.model_fields), "add a case for the new sidecar setting"


def sidecar_env_name(field: str) -> str:
    return {"pooled_url": "POOLKIT_POOLED_URL", "direct_url": "POOLKIT_DIRECT_URL"}.get(
        field, f"POOLKIT_SIDECAR_{field.upper()}"
    )


def base_for(field: str) -> dict[str, str]:
    """A valid upstream unless the case is about that URL (the pooled URL wins when both are set)."""
    return {} if field == "direct_url" else {"direct_url": LOOPBACK}


@pytest.mark.parametrize("case", SIDECAR, ids=str)
def test_sidecar_env_error_names_the_variable(monkeypatch: pytest.MonkeyPatch, case: SidecarCase) -> None:
    for key, value in base_for(case.field).items():
        monkeypatch.setenv(sidecar_env_name(key), value)
    monkeypatch.setenv(sidecar_env_name(case.field), case.env_value)
    with pytest.raises(ConfigError) as info:
        load_sidecar_settings(None)
    assert_clear(str(info.value), [case.field, sidecar_env_name(case.field), *case.fragments])
    assert info.value.__cause__ is None


@pytest.mark.parametrize("case", SIDECAR, ids=str)
def test_sidecar_file_error_names_the_file(tmp_path: Path, case: SidecarCase) -> None:
    config = tmp_path / "sidecar.toml"
    lines = [f"{key} = {json.dumps(value)}" for key, value in base_for(case.field).items()]
    if isinstance(case.value, dict):
        lines.append(
            f"[{case.field}]\n" + "\n".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in case.value.items())
        )
    else:
        lines.insert(0, f"{case.field} = {json.dumps(case.value)}")
    config.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_sidecar_settings(config)
    message = str(info.value)
    assert_clear(message, [case.field, *case.fragments])
    if case.field not in ("pooled_url", "direct_url"):  # URL errors come from the URL parser, named by variable
        assert f"{case.field} (config file {config})" in message


@pytest.mark.parametrize("case", SIDECAR, ids=str)
def test_sidecar_flag_error_names_the_flag(case: SidecarCase) -> None:
    value = case.value
    if isinstance(value, str) and value in ("inf", "nan", "1e309"):
        value = float(value)
    with pytest.raises(ConfigError) as info:
        load_sidecar_settings(None, **base_for(case.field), **{case.field: value})
    message = str(info.value)
    assert_clear(message, [case.field, *case.fragments])
    if case.field != "direct_url":  # the URL parser names it by its variable: "direct_url (env POOLKIT_DIRECT_URL)"
        assert f"{case.field} (flag)" in message


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"POOLKIT_SIDECAR_USERS": '{"app": "' + SECRET}, ["POOLKIT_SIDECAR_USERS (users)", "not valid JSON"]),
        ({"POOLKIT_SIDECAR_USERS": '["app"]'}, ["POOLKIT_SIDECAR_USERS (users)", "valid dictionary"]),
    ],
)
def test_sidecar_users_that_are_not_a_json_object(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragments: list[str]
) -> None:
    monkeypatch.setenv("POOLKIT_DIRECT_URL", LOOPBACK)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:  # was pydantic-settings' SettingsError, which named no variable
        load_sidecar_settings(None)
    assert_clear(str(info.value), fragments)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("this is not toml\n", ["is not valid TOML", "line 1"]),
        ('max_conns = 3\ndirect_url = "' + LOOPBACK + '"\n', ["max_conns (config file", "unknown setting", "max_size"]),
    ],
)
def test_sidecar_config_file_that_is_not_toml_or_has_unknown_keys(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sidecar_settings(config)
    assert_clear(str(info.value), [str(config), *fragments])


def test_sidecar_unknown_flag_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="unknown sidecar setting 'max_conns'"):
        load_sidecar_settings(None, direct_url=LOOPBACK, max_conns=3)
    with pytest.raises(ConfigError, match=r"config file /nonexistent/sidecar.toml does not exist \(--config"):
        load_sidecar_settings("/nonexistent/sidecar.toml")


@pytest.mark.parametrize("field", sorted(CHECKED_AT_START))
def test_sidecar_start_names_the_setting_it_cannot_use(field: str) -> None:
    value, fragment = CHECKED_AT_START[field]
    extra: dict[str, Any] = {"users": {"app": SECRET}} if field == "listen_host" else {}  # trust needs loopback
    settings = load_sidecar_settings(None, direct_url=LOOPBACK, listen_port=0, http_port=0, **{field: value}, **extra)

    async def start() -> None:
        app = Sidecar(settings)
        try:
            await app.start()
        finally:
            await app.shutdown(0)

    with pytest.raises(SidecarError) as info:
        asyncio.run(start())
    assert_clear(str(info.value), [fragment, field])
