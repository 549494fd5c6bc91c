"""Settings: every env name, precedence, keyword overrides, and each validation message."""

from __future__ import annotations

import pytest

from poolkit import ConfigError, Settings, load_settings
from poolkit.core.settings import DIRECT_URL_ENV, POOLED_URL_ENV

A = "postgresql://app:pw-a@a.example.com:6543/postgres"
B = "postgresql://app:pw-b@b.example.com:5432/postgres"
C = "postgresql://app:pw-c@c.example.com:5432/postgres"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*POOLED_URL_ENV, *DIRECT_URL_ENV):
        monkeypatch.delenv(name, raising=False)
    for field in Settings.model_fields:
        monkeypatch.delenv(f"POOLKIT_{field.upper()}", raising=False)


@pytest.mark.parametrize("name", POOLED_URL_ENV)
def test_each_pooled_name_is_read(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, A)
    assert load_settings().pooled_dsn().host == "a.example.com"


@pytest.mark.parametrize("name", DIRECT_URL_ENV)
def test_each_direct_name_is_read(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, B)
    dsn = load_settings().direct_dsn()
    assert dsn is not None and dsn.host == "b.example.com"


def test_precedence_is_poolkit_then_database_url_then_prisma(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PRISMA_URL", C)
    assert load_settings().pooled_dsn().host == "c.example.com"
    monkeypatch.setenv("DATABASE_URL", B)
    assert load_settings().pooled_dsn().host == "b.example.com"
    monkeypatch.setenv("POOLKIT_POOLED_URL", A)
    assert load_settings().pooled_dsn().host == "a.example.com"
    # A keyword beats every variable.
    assert load_settings(pooled_url=C).pooled_dsn().host == "c.example.com"


def test_direct_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_URL_NON_POOLING", C)
    monkeypatch.setenv("DIRECT_DATABASE_URL", B)
    assert load_settings().direct_dsn().host == "b.example.com"  # type: ignore[union-attr]
    monkeypatch.setenv("POOLKIT_DIRECT_URL", A)
    assert load_settings().direct_dsn().host == "a.example.com"  # type: ignore[union-attr]


def test_only_a_direct_url_serves_the_app_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIRECT_DATABASE_URL", B)
    # Without a word, the app's queries would bypass the pooler: refused, naming both ways out.
    with pytest.raises(ConfigError) as info:
        load_settings().pooled_dsn()
    message = str(info.value)
    assert "no pooled URL is configured" in message
    assert "DIRECT_DATABASE_URL (direct_url)" in message
    assert "POOLKIT_POOLED_URL" in message and "POOLKIT_POOL_MODE=direct" in message
    monkeypatch.setenv("POOLKIT_POOL_MODE", "direct")
    assert load_settings().pooled_dsn().host == "b.example.com"
    assert load_settings(pool_mode="direct").pooled_dsn().host == "b.example.com"


def test_every_knob_from_env_and_keyword(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", A)
    monkeypatch.setenv("POOLKIT_MAX_SIZE", "3")
    monkeypatch.setenv("POOLKIT_IDLE_TIMEOUT", "5.5")
    monkeypatch.setenv("POOLKIT_DRIVER", "psycopg")
    monkeypatch.setenv("POOLKIT_APPLICATION_NAME", "billing")
    monkeypatch.setenv("POOLKIT_POOL_MODE", "session")
    s = load_settings()
    assert (s.max_size, s.idle_timeout, s.driver, s.application_name, s.pool_mode) == (
        3,
        5.5,
        "psycopg",
        "billing",
        "session",
    )
    assert load_settings(max_size=2, idle_timeout=1).max_size == 2


def test_serverless_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", A)
    s = load_settings()
    assert (s.max_size, s.min_size, s.idle_timeout, s.connect_timeout) == (1, 0, 20.0, 10.0)
    assert s.application_name == "poolkit" and s.sslmode is None and s.profile == "serverless"


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"POOLKIT_MAX_SIZE": "10"}, ["POOLKIT_MAX_SIZE", "serverless range 1-3", "POOLKIT_PROFILE=server"]),
        ({"POOLKIT_MAX_SIZE": "0"}, ["POOLKIT_MAX_SIZE", "at least 1"]),
        ({"POOLKIT_MAX_SIZE": "lots"}, ["POOLKIT_MAX_SIZE", "integer"]),
        ({"POOLKIT_MIN_SIZE": "2"}, ["POOLKIT_MIN_SIZE", "between 0 and max_size"]),
        ({"POOLKIT_IDLE_TIMEOUT": "-1"}, ["POOLKIT_IDLE_TIMEOUT", "greater than 0"]),
        ({"POOLKIT_CONNECT_TIMEOUT": "0"}, ["POOLKIT_CONNECT_TIMEOUT", "greater than 0"]),
        ({"POOLKIT_ACQUIRE_TIMEOUT": "soon"}, ["POOLKIT_ACQUIRE_TIMEOUT"]),
        ({"POOLKIT_POOL_MODE": "statement"}, ["POOLKIT_POOL_MODE", "transaction"]),
        ({"POOLKIT_DRIVER": "pg8000"}, ["POOLKIT_DRIVER", "asyncpg"]),
        ({"POOLKIT_PROFILE": "huge"}, ["POOLKIT_PROFILE", "serverless"]),
        ({"POOLKIT_SSLMODE": "verify-full"}, ["sslrootcert", "POOLKIT_SSLROOTCERT"]),
        ({"POOLKIT_SSLROOTCERT": "/nonexistent/ca.pem"}, ["POOLKIT_SSLROOTCERT", "no such file"]),
        ({"POOLKIT_NAME": "has space"}, ["POOLKIT_NAME", "metric label"]),
        ({"DATABASE_URL": "mysql://u:pw@h/db"}, ["DATABASE_URL", "scheme 'mysql'"]),
        ({"DATABASE_URL": "postgresql://u:pw@h:notaport/db"}, ["DATABASE_URL", "port"]),
        ({"DATABASE_URL": "postgresql://u:pw@/db"}, ["DATABASE_URL", "no host"]),
        ({"DATABASE_URL": "postgresql://db.example.com/db"}, ["DATABASE_URL", "no user"]),
        (
            {"DATABASE_URL": "postgresql://u:pw@db.example.com/db?sslmode=disable"},
            ["DATABASE_URL", "loopback"],
        ),
        (
            {"DATABASE_URL": "postgresql://u:pw@db.example.com/db?sslmode=prefer"},
            ["DATABASE_URL", "sslmode=require"],
        ),
        ({"DATABASE_URL": "postgresql://u:pw@db.example.com/db?sslmode=maybe"}, ["DATABASE_URL", "sslmode"]),
        ({"DIRECT_DATABASE_URL": "http://u:pw@h/db"}, ["DIRECT_DATABASE_URL", "scheme"]),
    ],
)
def test_validation_names_the_setting_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragments: list[str]
) -> None:
    monkeypatch.setenv("POOLKIT_POOLED_URL", "postgresql://app:pw@db.example.com:6543/postgres")
    for key, value in env.items():
        if key in POOLED_URL_ENV:
            monkeypatch.delenv("POOLKIT_POOLED_URL")
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert ":pw@" not in message and "pw-" not in message
    assert info.value.__cause__ is None  # pydantic's error (which shows the input) is not chained


def test_keyword_errors_name_the_keyword() -> None:
    with pytest.raises(ConfigError, match=r"max_size \(keyword argument\).*serverless"):
        load_settings(pooled_url=A, max_size=4)
    with pytest.raises(ConfigError, match="unknown setting 'max_conns'"):
        load_settings(pooled_url=A, max_conns=4)
    with pytest.raises(ConfigError, match=r"pooled_url \(keyword argument\) has scheme"):
        load_settings(pooled_url="mysql://x:y@h/db")


def test_server_profile_allows_larger_pools() -> None:
    assert load_settings(pooled_url=A, profile="server", max_size=20).max_size == 20


def test_plain_text_is_allowed_for_loopback_only() -> None:
    s = load_settings(pooled_url="postgresql://app:pw@127.0.0.1:5432/app?sslmode=disable")
    assert s.pooled_dsn().query["sslmode"] == "disable"


def test_no_url_at_all_says_what_to_set() -> None:
    with pytest.raises(ConfigError, match=r"POOLKIT_POOLED_URL.*DATABASE_URL.*poolkit dev"):
        load_settings().pooled_dsn()


def test_repr_never_shows_the_password() -> None:
    s = load_settings(pooled_url="postgresql://app:Sup3r-Secret@db.example.com:6543/postgres")
    assert "Sup3r-Secret" not in repr(s) and "Sup3r-Secret" not in str(s)
    assert "app:***@db.example.com:6543" in repr(s)
