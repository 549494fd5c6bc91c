"""Settings from the environment and keywords (pydantic-settings), validated with messages that name the setting."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from poolkit.core.detect import url_tls_problem
from poolkit.core.dsn import SSL_MODES, Dsn
from poolkit.errors import ConfigError

# Order is precedence: the first variable that is set wins. poolkit's own names come first so that an app
# can point poolkit somewhere else than its ORM without renaming what the platform injects.
POOLED_URL_ENV = ("POOLKIT_POOLED_URL", "DATABASE_URL", "POSTGRES_PRISMA_URL")
DIRECT_URL_ENV = ("POOLKIT_DIRECT_URL", "DIRECT_DATABASE_URL", "POSTGRES_URL_NON_POOLING")

SERVERLESS_MAX_SIZE = 3
# The pool factories' connection hooks (poolkit.pool.base.ConnectionHooks): keywords, but not settings.
HOOK_NAMES = ("init", "setup", "configure", "reset")
ENV_PREFIX = "POOLKIT_"
SIDECAR_ENV_PREFIX = "POOLKIT_SIDECAR_"
# Variables poolkit reads outside the Settings model: `poolkit dev`'s binaries (README "The local stack"),
# and the test suite's and scripts' own switches. The settings' names come from the model itself.
OTHER_ENV = frozenset(
    {
        "POOLKIT_PG_BINDIR",
        "POOLKIT_PGBOUNCER",
        "POOLKIT_FAULT_SEED",
        "POOLKIT_LIVE",
        "POOLKIT_PROMETHEUS_URL",
        "POOLKIT_SCREENSHOT",
        "POOLKIT_SETUP_PROMETHEUS",
        "POOLKIT_CONFORMANCE_CACHE",
    }
)
# A loopback URL: lets a setting's sslmode be judged by the same rule (and message) as a URL's.
_LOOPBACK = Dsn(host="127.0.0.1", port=5432, user="poolkit", database="poolkit")
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
    # Callers that may wait for a busy pool at once; one more fails at once with TooManyWaiting (0: no limit).
    max_waiting: int = 0

    @field_validator("sslmode", mode="before")
    @classmethod
    def _check_sslmode(cls, value: Any) -> Any:
        # Before the Literal check, so that POOLKIT_SSLMODE=prefer is explained as sslmode=prefer in a URL is.
        if isinstance(value, str):
            if value not in SSL_MODES:
                raise ValueError(f"is {value!r}; use require (the default), verify-ca or verify-full")
            # The URL rule for the modes that fall back to plain text; the others are checked with the URLs.
            problem = url_tls_problem(_LOOPBACK, sslmode=value) if value in ("allow", "prefer") else None
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("sslrootcert", mode="before")
    @classmethod
    def _check_rootcert_given(cls, value: Any) -> Any:
        # An empty variable would become Path("."), a directory: say what is wrong instead of "no such file".
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                "is set but empty: set it to the PEM file of the CA that signed the server certificate, or unset it"
            )
        return value

    @field_validator("max_waiting")
    @classmethod
    def _check_max_waiting(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 (no limit) or more")
        return value

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
        """The URL the app's queries go to: the pooled URL (the direct one only with ``pool_mode="direct"``).

        With only a direct URL set, the app's queries would bypass the pooler, the connection exhaustion
        poolkit exists to prevent (a misspelt ``POOLKIT_POOLED_URL`` looks just like that): it is refused
        unless ``pool_mode`` says direct on purpose.
        """
        if self.pooled_url is not None:
            return Dsn.parse(self.pooled_url.get_secret_value(), setting=_env_label("pooled_url"))
        if self.direct_url is None:
            raise ConfigError(
                "no database URL is configured: set POOLKIT_POOLED_URL (or DATABASE_URL) to the transaction "
                "pooler's URL, and POOLKIT_DIRECT_URL (or DIRECT_DATABASE_URL) to the direct one. "
                "`poolkit dev` starts a local stack and prints both"
            )
        if self.pool_mode != "direct":
            raise ConfigError(
                f"no pooled URL is configured ({', '.join(POOLED_URL_ENV)} are unset), only the direct URL "
                f"({_env_label('direct_url')}): poolkit does not send the app's queries past the pooler "
                "without being told. Set POOLKIT_POOLED_URL to the transaction pooler's URL (Supabase: port "
                "6543), or set POOLKIT_POOL_MODE=direct (pool_mode='direct') to use the direct URL for them "
                "(a long-lived server that owns its connection budget, local development)"
            )
        return Dsn.parse(self.direct_url.get_secret_value(), setting=_env_label("direct_url"))

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


# ---------------------------------------------------------------- shared with poolkit/sidecar/policy/config.py


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
        if os.environ.get(name) is not None:  # set, even if empty: pydantic-settings reads an empty one too
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


def env_names(model: type[BaseSettings], prefix: str) -> frozenset[str]:
    """Every environment variable a settings model reads: ``prefix`` + each field, and each field's env aliases."""
    names: set[str] = set()
    for field, info in model.model_fields.items():
        names.add(f"{prefix}{field}".upper())
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
    return frozenset(names)


def unknown_env_problems(
    known: Iterable[str], *, prefix: str, skip_prefix: str | None = None, environ: Mapping[str, str] | None = None
) -> list[str]:
    """One message per ``prefix*`` variable in ``environ`` that is not in ``known``, naming the closest known one.

    Names compare case-insensitively, as pydantic-settings reads them. A misspelt variable would otherwise be
    ignored without a word (``POOLKIT_MAXSIZE=5`` leaves max_size at 1).
    """
    known_upper = {name.upper() for name in known}
    # Compared without the shared prefix, which would make every name look alike.
    tails = {k.removeprefix(prefix): k for k in sorted(known_upper) if k.startswith(prefix)}
    problems = []
    for name in sorted(os.environ if environ is None else environ):
        upper = name.upper()
        if not upper.startswith(prefix) or upper in known_upper:
            continue
        if skip_prefix is not None and upper.startswith(skip_prefix):
            continue
        close = difflib.get_close_matches(upper.removeprefix(prefix), tails, n=1, cutoff=0.6)
        hint = f"did you mean {tails[close[0]]}?" if close else "no setting is named like it"
        problems.append(f"{name} is not a poolkit setting ({hint})")
    return problems


def library_env_names() -> frozenset[str]:
    """The variables the library reads (its settings, the URL names platforms inject) or documents."""
    return env_names(Settings, ENV_PREFIX) | OTHER_ENV


def check_env(environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError naming each unknown ``POOLKIT_*`` variable (``POOLKIT_SIDECAR_*`` is the sidecar's)."""
    problems = unknown_env_problems(
        library_env_names(), prefix=ENV_PREFIX, skip_prefix=SIDECAR_ENV_PREFIX, environ=environ
    )
    if problems:
        raise ConfigError(
            "invalid poolkit settings: "
            + "; ".join(problems)
            + ". Rename or unset it: an unknown variable is never read (the README's Settings table lists them)"
        )


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, with keyword overrides; raise ConfigError naming what is wrong.

    An environment variable that starts with ``POOLKIT_`` but names no setting is an error too.
    """
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown and unknown[0] in HOOK_NAMES:
        raise ConfigError(
            f"{unknown[0]}= is a connection hook, not a setting: pass it to poolkit.create_pool() or "
            "create_sync_pool() (the process-wide get_pool() takes settings only)"
        )
    if unknown:
        close = difflib.get_close_matches(unknown[0], Settings.model_fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown setting {unknown[0]!r}; {hint}known settings: {', '.join(sorted(Settings.model_fields))}"
        )
    check_env()
    for field in ("pooled_url", "direct_url"):
        value = overrides.get(field)
        if value is not None:
            raw = value.get_secret_value() if isinstance(value, SecretStr) else value
            Dsn.parse(raw, setting=f"{field} (keyword argument)")
    # The ConfigError is raised outside the except blocks: pydantic's ValidationError (which ends in "For
    # further information visit ...") must not ride along as its context.
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        message = _explain(exc, overrides)
    except ConfigError as exc:  # a URL that Dsn.parse rejected
        message = str(exc)
    raise ConfigError(message)


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
