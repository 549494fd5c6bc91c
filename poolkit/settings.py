"""Settings from the environment and keywords (pydantic-settings), validated with messages that name the setting."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from poolkit.detect import url_tls_problem
from poolkit.dsn import Dsn
from poolkit.errors import ConfigError

# Order is precedence: the first variable that is set wins. poolkit's own names come first so that an app
# can point poolkit somewhere else than its ORM without renaming what the platform injects.
POOLED_URL_ENV = ("POOLKIT_POOLED_URL", "DATABASE_URL", "POSTGRES_PRISMA_URL")
DIRECT_URL_ENV = ("POOLKIT_DIRECT_URL", "DIRECT_DATABASE_URL", "POSTGRES_URL_NON_POOLING")

SERVERLESS_MAX_SIZE = 3
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

Driver = Literal["asyncpg", "psycopg"]
PoolMode = Literal["auto", "transaction", "session", "direct"]
Profile = Literal["serverless", "server"]
SslMode = Literal["disable", "require", "verify-ca", "verify-full"]
Environment = Literal["production", "development"]


class Settings(BaseSettings):
    """Every poolkit knob. Each is read from ``POOLKIT_<NAME>`` and can be overridden by keyword.

    The URLs also accept the names platforms already inject (see ``POOLED_URL_ENV`` and
    ``DIRECT_URL_ENV``, in order of precedence).
    """

    model_config = SettingsConfigDict(
        env_prefix="POOLKIT_",
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        validate_default=True,
    )

    pooled_url: SecretStr | None = Field(None, validation_alias=AliasChoices(*POOLED_URL_ENV))
    direct_url: SecretStr | None = Field(None, validation_alias=AliasChoices(*DIRECT_URL_ENV))
    pool_mode: PoolMode = "auto"
    driver: Driver = "asyncpg"
    profile: Profile = "serverless"
    name: str = "default"
    max_size: int = 1
    min_size: int = 0
    idle_timeout: float = 20.0
    connect_timeout: float = 10.0
    acquire_timeout: float = 10.0
    max_lifetime: float = 1800.0
    sslmode: SslMode | None = None
    sslrootcert: Path | None = None
    application_name: str = "poolkit"
    slow_query_seconds: float = 1.0
    env: Environment = "production"
    query_log: bool = False

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("use 1-64 letters, digits, '_', '.' or '-' (it becomes a metric label)")
        return value

    @field_validator("application_name")
    @classmethod
    def _check_application_name(cls, value: str) -> str:
        if not value or len(value) > 63 or not value.isprintable():
            raise ValueError("use 1-63 printable characters (PostgreSQL truncates at 63)")
        return value

    @field_validator("idle_timeout", "connect_timeout", "acquire_timeout", "max_lifetime", "slow_query_seconds")
    @classmethod
    def _check_positive(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError("must be a number of seconds greater than 0")
        return value

    @field_validator("sslrootcert")
    @classmethod
    def _check_rootcert(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file: point it at the PEM file of the CA that signed the server certificate")
        return value

    @model_validator(mode="after")
    def _check_sizes(self) -> Settings:
        if self.max_size < 1:
            raise FieldError("max_size", "must be at least 1")
        if self.min_size < 0 or self.min_size > self.max_size:
            raise FieldError("min_size", f"must be between 0 and max_size ({self.max_size})")
        if self.profile == "serverless" and self.max_size > SERVERLESS_MAX_SIZE:
            raise FieldError(
                "max_size",
                f"{self.max_size} is above the serverless range 1-{SERVERLESS_MAX_SIZE}. Every serverless instance "
                f"opens its own pool, so 100 instances x {self.max_size} = {100 * self.max_size} connections, "
                "while a small Supabase plan allows about 60 direct connections. Keep max_size at 1-3, or set "
                "profile='server' (POOLKIT_PROFILE=server) for a long-lived process that owns its budget",
            )
        if self.sslmode in ("verify-ca", "verify-full") and self.sslrootcert is None:
            raise FieldError("sslrootcert", f"sslmode={self.sslmode} needs the CA certificate: set POOLKIT_SSLROOTCERT")
        for field in ("pooled_url", "direct_url"):
            secret: SecretStr | None = getattr(self, field)
            if secret is not None:
                dsn = Dsn.parse(secret.get_secret_value(), setting=_env_label(field))
                self._check_tls(dsn, field)
        return self

    def _check_tls(self, dsn: Dsn, field: str) -> None:
        problem = url_tls_problem(dsn, sslmode=self.sslmode, rootcert_configured=self.sslrootcert is not None)
        if problem is not None:
            raise FieldError(field, problem)

    # -- derived values ---------------------------------------------------------------------------------------

    def pooled_dsn(self) -> Dsn:
        """The URL the app's queries go to: the pooled URL, or the direct one if only that is set."""
        secret = self.pooled_url or self.direct_url
        if secret is None:
            raise ConfigError(
                "no database URL is configured: set POOLKIT_POOLED_URL (or DATABASE_URL) to the transaction "
                "pooler's URL, and POOLKIT_DIRECT_URL (or DIRECT_DATABASE_URL) to the direct one. "
                "`poolkit dev` starts a local stack and prints both"
            )
        field = "pooled_url" if self.pooled_url is not None else "direct_url"
        return Dsn.parse(secret.get_secret_value(), setting=_env_label(field))

    def direct_dsn(self) -> Dsn | None:
        """The direct URL, if one is configured."""
        if self.direct_url is None:
            return None
        return Dsn.parse(self.direct_url.get_secret_value(), setting=_env_label("direct_url"))

    def key(self) -> tuple[Any, ...]:
        """What identifies a pool: two Settings with the same key can share one."""
        return tuple(v.get_secret_value() if isinstance(v, SecretStr) else v for v in self.model_dump().values())

    def __repr_args__(self) -> Any:
        return redacted_repr_args(super().__repr_args__())


# ---------------------------------------------------------------- shared with poolkit/sidecar/config.py


def redacted_repr_args(args: Iterable[tuple[str | None, Any]]) -> Iterator[tuple[str | None, Any]]:
    """A settings model's repr arguments with its URLs shown redacted (host kept, password hidden).

    SecretStr already hides them; showing the host keeps a repr useful for debugging.
    """
    for name, value in args:
        if name in ("pooled_url", "direct_url") and isinstance(value, SecretStr):
            yield name, Dsn.parse(value.get_secret_value()).redacted()
        else:
            yield name, value


class FieldError(ValueError):
    """A validator's error about a setting other than the one pydantic reports (a cross-field check)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def env_label(field: str, names: tuple[str, ...]) -> str:
    """How to name a setting in a message: the env variable (of ``names``) that set it, or the first one."""
    for name in names:
        if os.environ.get(name):
            return f"{name} ({field})"
    return f"{field} (env {names[0]})"


def error_parts(err: Mapping[str, Any]) -> tuple[str, str] | str:
    """One pydantic error as (setting, message), or a finished message when a ConfigError (a URL) explains it."""
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, FieldError):
        return inner.field, str(inner)
    if isinstance(inner, ConfigError):
        return str(inner)
    loc = err.get("loc") or ()
    return (str(loc[0]) if loc else "settings"), str(err["msg"]).removeprefix("Value error, ")


def _env_label(field: str) -> str:
    if field == "pooled_url":
        return env_label(field, POOLED_URL_ENV)
    if field == "direct_url":
        return env_label(field, DIRECT_URL_ENV)
    return env_label(field, (f"POOLKIT_{field.upper()}",))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, with keyword overrides; raise ConfigError naming what is wrong."""
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(Settings.model_fields))}")
    for field in ("pooled_url", "direct_url"):
        value = overrides.get(field)
        if value is not None:
            raw = value.get_secret_value() if isinstance(value, SecretStr) else value
            Dsn.parse(raw, setting=f"{field} (keyword argument)")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, overrides)) from None
    except ConfigError as exc:  # a URL that Dsn.parse rejected
        raise ConfigError(str(exc)) from None


def _explain(exc: ValidationError, overrides: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        parts = error_parts(err)
        if isinstance(parts, str):
            lines.append(parts)
            continue
        field, msg = parts
        if field in Settings.model_fields:
            label = f"{field} (keyword argument)" if field in overrides else _env_label(field)
        else:
            label = field
        lines.append(f"{label}: {msg}")
    return "invalid poolkit settings: " + "; ".join(lines)
