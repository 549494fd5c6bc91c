"""The sidecar's settings (pydantic-settings): env ``POOLKIT_SIDECAR_*``, an optional TOML file, flags."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from poolkit.core.detect import Mode, detect_mode, url_tls_problem
from poolkit.core.dsn import Dsn
from poolkit.core.settings import (
    DIRECT_URL_ENV,
    POOLED_URL_ENV,
    FieldError,
    env_label,
    env_names,
    error_parts,
    library_env_names,
    redacted_repr_args,
    unknown_env_problems,
)
from poolkit.errors import ConfigError
from poolkit.sidecar.wire.protocol import PG_MAX_MESSAGE_SIZE

ENV_PREFIX = "POOLKIT_SIDECAR_"
# Read by `poolkit sidecar` itself (the config file's path), not by the settings model.
CLI_ENV = frozenset({f"{ENV_PREFIX}CONFIG"})
AuthType = Literal["auto", "scram-sha-256", "trust"]
ClientTls = Literal["disable", "allow", "require"]
Upstream = Literal["auto", "pooled", "direct"]
UpstreamMode = Literal["auto", "session", "transaction"]

# Settings that SIGHUP can change in place; the others need a restart.
RELOADABLE = frozenset(
    {
        "pooled_url",
        "direct_url",
        "upstream",
        "sslrootcert",
        "max_size",
        "query_wait_timeout",
        "idle_transaction_timeout",
        "server_idle_timeout",
        "server_lifetime",
        "connect_timeout",
        "query_timeout",
        "server_check_delay",
        "server_check_timeout",
        "server_login_retry",
        "client_login_timeout",
        "shutdown_timeout",
        "slow_query_seconds",
        "auth_type",
        "users",
        "auth_file",
        "server_reset_query",
        "max_client_conn",
        "direct_max_size",
        "max_pinned_clients",
        "admin_users",
        "stats_users",
        "pipeline_depth",  # UpstreamPool.configure reads it on every reload
    }
)


class SidecarSettings(BaseSettings):
    """Every knob of ``poolkit sidecar``; each is read from ``POOLKIT_SIDECAR_<NAME>``.

    The upstream URLs use the library's names (``POOLKIT_POOLED_URL``, ``DATABASE_URL``,
    ``POSTGRES_PRISMA_URL``; ``POOLKIT_DIRECT_URL``, ``DIRECT_DATABASE_URL``,
    ``POSTGRES_URL_NON_POOLING``) and the CA file ``POOLKIT_SSLROOTCERT``. Timeouts are seconds;
    0 disables a timeout.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        validate_default=True,
    )
    config_file: ClassVar[Path | None] = None

    listen_host: str = "127.0.0.1"
    listen_port: int = 6432
    unix_socket_dir: Path | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 9930
    http_enabled: bool = True

    pooled_url: SecretStr | None = Field(None, validation_alias=AliasChoices("pooled_url", *POOLED_URL_ENV))
    direct_url: SecretStr | None = Field(None, validation_alias=AliasChoices("direct_url", *DIRECT_URL_ENV))
    upstream: Upstream = "auto"
    # What the upstream keeps between transactions: "transaction" (a transaction pooler such as Supavisor
    # or PgBouncer in transaction mode: each transaction may run on another backend) or "session".
    # auto: the pooled URL is a transaction pooler unless it is Supabase's session pooler; the direct URL
    # is a session (see upstream_pooling).
    upstream_mode: UpstreamMode = "auto"
    sslrootcert: Path | None = Field(
        None, validation_alias=AliasChoices("sslrootcert", f"{ENV_PREFIX}SSLROOTCERT", "POOLKIT_SSLROOTCERT")
    )
    pool_name: str | None = None
    application_name: str = "poolkit-sidecar"

    # None: 3 where the upstream keeps sessions (each connection is a database backend), 10 in front of a
    # transaction pooler (see effective_max_size).
    max_size: int | None = None
    max_client_conn: int = 10_000
    # The direct upstream beside a pooled one (introspection, DDL, pinned clients); see session.py.
    direct_max_size: int = 3
    # None: one less than the connections pins draw from (direct_max_size or max_size), at least 1.
    max_pinned_clients: int | None = None
    query_wait_timeout: float = 30.0
    idle_transaction_timeout: float = 300.0
    server_idle_timeout: float = 20.0
    server_lifetime: float = 3600.0
    connect_timeout: float = 10.0
    # A query (up to its ReadyForQuery) running longer ends its client with 57014 and closes its server
    # (PgBouncer's name). Off by default: a long report or CREATE INDEX looks exactly like a stalled
    # upstream, and only the operator knows how long a legitimate query may run.
    query_timeout: float = 0.0
    # A server connection idle this long gets an empty query before it is handed out (PgBouncer's
    # server_check_delay; 0 = before every hand-out): one round trip that catches a connection that died
    # silently (NAT expiry, host crash). The check may take server_check_timeout before it is given up.
    server_check_delay: float = 30.0
    server_check_timeout: float = 2.0
    # After a failed connect/login, wait this long before the next attempt (PgBouncer's
    # server_login_retry, whose default is 15 s): an outage then costs about one attempt per second
    # instead of hundreds, and the pool is serving again within a second of the upstream's return.
    server_login_retry: float = 1.0
    client_login_timeout: float = 60.0
    shutdown_timeout: float = 30.0
    slow_query_seconds: float = 1.0
    # The sidecar streams message bodies and never buffers a claimed length, so this limit only
    # rejects garbage early; PostgreSQL's own limit (1 GiB - 1) lets every message it accepts pass.
    max_message_size: int = PG_MAX_MESSAGE_SIZE
    server_reset_query: str = "DISCARD ALL"
    # Named prepared statements kept per server connection (LRU, as PgBouncer's setting of the same
    # name); 0 turns the feature off and passes statement names through untouched. Needs a restart.
    max_prepared_statements: int = 200
    # How many clients' one-statement autocommit requests may queue on a busy server connection behind
    # the one it runs (pipelining across clients; 0 turns it off). Saves the round trip between
    # transactions and lets PostgreSQL read several requests per wake-up; see server.py.
    pipeline_depth: int = 16

    auth_type: AuthType = "auto"
    users: dict[str, SecretStr] = Field(default_factory=dict)
    auth_file: Path | None = None
    admin_database: str = "poolkit"
    # Who may use the admin console (PgBouncer's names, comma-separated or a list). Unset admin_users
    # means the upstream URL's role: the one user whose password the operator already holds, and who
    # can do more than any console command upstream anyway. Everyone else is refused at login.
    admin_users: Annotated[list[str] | None, NoDecode] = None
    stats_users: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A pool per user, logging in upstream as the client's user with its password from users/auth_file
    # (PgBouncer's pools per user). Off: every client runs upstream as the URL's role (PgBouncer's
    # force_user), the simple default. Needs a restart: clients are bound to their pool at login.
    user_pools: bool = False
    client_tls: ClientTls | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: flags/keywords > environment > config file > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.config_file))
        return tuple(sources)

    @field_validator("admin_users", "stats_users", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        # PgBouncer's format (and the only one an env variable can carry without JSON quoting).
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("admin_users", "stats_users")
    @classmethod
    def _check_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not name or "\x00" in name or len(name.encode()) > 63:
                shown = f"{name[:20]!r}{'...' if len(name) > 20 else ''}"
                raise ValueError(
                    f"{shown} is no PostgreSQL role name (1 to 63 bytes, no NUL); "
                    'give user names separated by commas, e.g. "admin, ops"'
                )
        return value

    @field_validator("user_pools")
    @classmethod
    def _check_user_pools(cls, value: bool, info: ValidationInfo) -> bool:
        users, auth_file = info.data.get("users"), info.data.get("auth_file")
        if value and (info.data.get("auth_type") == "trust" or not (users or auth_file)):
            raise ValueError(
                "needs users with passwords (users or auth_file, and auth_type scram-sha-256 or auto): "
                "each user's pool logs in upstream with that user's password"
            )
        return value

    @field_validator("listen_port", "http_port")
    @classmethod
    def _check_port(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError("must be a TCP port from 1 to 65535 (0 picks a free port)")
        return value

    @field_validator("max_size", "max_client_conn", "direct_max_size")
    @classmethod
    def _check_count(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("max_prepared_statements")
    @classmethod
    def _check_prepared(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more (0 turns named prepared statement support off)")
        return value

    @field_validator("pipeline_depth")
    @classmethod
    def _check_pipeline(cls, value: int) -> int:
        if not 0 <= value <= 1000:
            raise ValueError("must be between 0 and 1000 (0 turns pipelining across clients off)")
        return value

    @field_validator("max_pinned_clients")
    @classmethod
    def _check_pinned(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError("must be 0 or more (0 refuses every session feature; unset: automatic)")
        return value

    @field_validator(
        "query_wait_timeout",
        "idle_transaction_timeout",
        "server_idle_timeout",
        "server_lifetime",
        "connect_timeout",
        "query_timeout",
        "client_login_timeout",
        "shutdown_timeout",
        "slow_query_seconds",
    )
    @classmethod
    def _check_seconds(cls, value: float) -> float:
        if not value >= 0 or value == float("inf"):
            raise ValueError("must be a number of seconds, 0 or more (0 disables it)")
        return value

    @field_validator("server_check_delay", "server_login_retry")
    @classmethod
    def _check_delay(cls, value: float) -> float:
        if not value >= 0 or value == float("inf"):
            raise ValueError("must be a number of seconds, 0 or more (0: no delay)")
        return value

    @field_validator("server_check_timeout")
    @classmethod
    def _check_positive_seconds(cls, value: float) -> float:
        if not value > 0 or value == float("inf"):
            raise ValueError("must be a number of seconds greater than 0")
        return value

    @field_validator("max_message_size")
    @classmethod
    def _check_message_size(cls, value: int) -> int:
        if not 1024 <= value <= PG_MAX_MESSAGE_SIZE:
            raise ValueError(f"must be between 1024 and {PG_MAX_MESSAGE_SIZE} bytes (PostgreSQL's own limit)")
        return value

    @field_validator("sslrootcert", "auth_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _check_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> SidecarSettings:
        if self.pooled_url is None and self.direct_url is None:
            raise FieldError(
                "pooled_url",
                "no upstream URL: set POOLKIT_POOLED_URL (or DATABASE_URL) to the database the sidecar "
                "forwards to; `poolkit dev` starts a local stack and prints one",
            )
        upstreams = [(self.upstream_field(), self.upstream_dsn())]
        if self.direct_route_enabled:
            upstreams.append(("direct_url", self.direct_dsn()))
        for field, dsn in upstreams:
            problem = url_tls_problem(dsn, rootcert_configured=self.sslrootcert is not None)
            if problem is not None:
                raise FieldError(field, problem)
        if self.effective_auth_type == "scram-sha-256" and not self.users and self.auth_file is None:
            raise FieldError(
                "auth_type",
                "is scram-sha-256 but no users are configured: set POOLKIT_SIDECAR_USERS "
                '(JSON, e.g. {"app": "secret"}) or POOLKIT_SIDECAR_AUTH_FILE (PgBouncer userlist.txt)',
            )
        if self.effective_client_tls != "disable" and (self.tls_cert_file is None or self.tls_key_file is None):
            raise FieldError(
                "client_tls",
                f"is {self.client_tls} but tls_cert_file and tls_key_file are not both set",
            )
        if self.effective_auth_type == "trust" and not _is_loopback_host(self.listen_host):
            raise FieldError(
                "auth_type",
                "trust only applies to loopback and Unix-socket clients, but "
                f"listen_host={self.listen_host!r} accepts remote ones: configure users (scram-sha-256) "
                "or listen on 127.0.0.1",
            )
        for name in self.users:
            if not name or "\x00" in name:
                raise FieldError("users", "user names must be non-empty and contain no NUL")
        return self

    # ------------------------------------------------------------- derived values

    @property
    def effective_auth_type(self) -> Literal["scram-sha-256", "trust"]:
        """``auto`` means scram-sha-256 when users are configured, else trust (loopback only)."""
        if self.auth_type == "auto":
            return "scram-sha-256" if (self.users or self.auth_file is not None) else "trust"
        return self.auth_type

    @property
    def effective_client_tls(self) -> ClientTls:
        if self.client_tls is not None:
            return self.client_tls
        return "allow" if self.tls_cert_file is not None and self.tls_key_file is not None else "disable"

    def upstream_field(self) -> str:
        use_direct = self.upstream == "direct" or (self.upstream == "auto" and self.pooled_url is None)
        return "direct_url" if use_direct else "pooled_url"

    @property
    def route(self) -> Literal["pooled", "direct"]:
        """Which configured URL the sidecar forwards to (a metric label)."""
        return "direct" if self.upstream_field() == "direct_url" else "pooled"

    @property
    def upstream_pooling(self) -> tuple[Literal["session", "transaction"], str]:
        """Whether the upstream keeps sessions, and why the sidecar thinks so (logged at start)."""
        if self.upstream_mode != "auto":
            return self.upstream_mode, f"upstream_mode={self.upstream_mode}"
        if self.route == "direct":
            return "session", "the upstream is the direct URL"
        found = detect_mode(self.upstream_dsn())
        if found.mode is Mode.SESSION:
            return "session", found.reason
        # A pooled URL without markers is still the pooler it is named after: assuming a session there
        # would break named statements and settings when transactions move between backends, while
        # assuming a transaction pooler in front of a session costs only a re-prepare per transaction.
        reason = found.reason if found.mode is Mode.TRANSACTION else "the pooled URL (no session-pooler markers)"
        return "transaction", reason

    @property
    def effective_max_size(self) -> int:
        """``max_size``, or its default for the upstream.

        In front of a transaction pooler an upstream connection is one of the pooler's clients, not a
        database backend: idle it holds nothing, and the pooler's own pool size bounds the backends. What
        it does bound is how many of this sidecar's transactions run at once, and over a network a
        multi-statement transaction holds its connection for several round trips (TPC-B at 1 ms one way
        ran at a third of the app's own 10 connections with 3). Ten keeps that bound near a typical app's
        own pool while a fleet of pods stays far below Supavisor's client limits; single-statement
        traffic needs far fewer (pipelining across clients shares connections), and the pool opens
        connections only as the load needs them.
        """
        if self.max_size is not None:
            return self.max_size
        return 10 if self.transaction_pooler else 3

    @property
    def transaction_pooler(self) -> bool:
        """True when the upstream may run each transaction on a different backend."""
        return self.upstream_pooling[0] == "transaction"

    @property
    def direct_route_enabled(self) -> bool:
        """True when the sidecar forwards to the pooled URL and also has a direct one (a second, small pool)."""
        return self.route == "pooled" and self.direct_url is not None

    def direct_dsn(self) -> Dsn:
        """The direct URL (``direct_url``); only meaningful when it is set."""
        if self.direct_url is None:
            raise FieldError("direct_url", "is not set")
        return Dsn.parse(self.direct_url.get_secret_value(), setting=_env_label("direct_url"))

    def upstream_dsn(self) -> Dsn:
        """The URL the sidecar forwards to: the pooled URL, else the direct one (``upstream`` can force)."""
        field = self.upstream_field()
        secret: SecretStr | None = getattr(self, field)
        if secret is None:
            raise FieldError(field, f"upstream={self.upstream} but {field} is not set")
        return Dsn.parse(secret.get_secret_value(), setting=_env_label(field))

    @property
    def effective_pool_name(self) -> str:
        return self.pool_name or self.upstream_dsn().database

    def __repr_args__(self) -> Any:
        return redacted_repr_args(super().__repr_args__())


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_names(field: str) -> tuple[str, ...]:
    if field == "pooled_url":
        return POOLED_URL_ENV
    if field == "direct_url":
        return DIRECT_URL_ENV
    if field == "sslrootcert":
        return (f"{ENV_PREFIX}SSLROOTCERT", "POOLKIT_SSLROOTCERT")
    return (f"{ENV_PREFIX}{field.upper()}",)


def _env_label(field: str) -> str:
    return env_label(field, _env_names(field))


def load_sidecar_settings(config_file: Path | str | None = None, **overrides: Any) -> SidecarSettings:
    """Read settings from flags (``overrides``, ``None`` values ignored), env and ``config_file`` (TOML).

    Raises :class:`ConfigError` naming each bad setting and how to fix it.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(SidecarSettings.model_fields))
    if unknown:
        raise ConfigError(f"unknown sidecar setting {unknown[0]!r}")
    check_sidecar_env()
    cls: type[SidecarSettings] = SidecarSettings
    file_keys: dict[str, Path] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (--config / POOLKIT_SIDECAR_CONFIG)")
        try:
            file_keys = dict.fromkeys(tomllib.loads(path.read_text()), path)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"invalid sidecar settings: config file {path} is not valid TOML: {exc}") from None
        cls = type("SidecarSettingsFromFile", (SidecarSettings,), {"config_file": path})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, overrides, file_keys)) from None
    except ConfigError as exc:
        raise ConfigError(f"invalid sidecar settings: {exc}") from None
    except SettingsError as exc:  # a JSON-valued variable (users) that is not JSON; the message names the field
        match = re.search(r'field "(\w+)"', str(exc))
        field = match.group(1) if match else "settings"
        raise ConfigError(
            f"invalid sidecar settings: {_env_label(field)}: is not valid JSON; "
            'give an object such as {"app": "password"}'
        ) from None


def check_sidecar_env(environ: dict[str, str] | None = None) -> None:
    """Raise ConfigError naming each unknown ``POOLKIT_SIDECAR_*`` variable, and each unknown ``POOLKIT_*`` one.

    The known names come from the settings model's fields (and their env aliases), so a new setting is known
    as soon as it exists. The sidecar reads the library's URL variables too (``POOLKIT_POOLED_URL``, ...),
    whose misspellings would make it forward somewhere else without a word.
    """
    known = env_names(SidecarSettings, ENV_PREFIX) | CLI_ENV
    problems = unknown_env_problems(known, prefix=ENV_PREFIX, environ=environ)
    problems += unknown_env_problems(library_env_names(), prefix="POOLKIT_", skip_prefix=ENV_PREFIX, environ=environ)
    if problems:
        raise ConfigError(
            "invalid sidecar settings: "
            + "; ".join(problems)
            + ". Rename or unset it: an unknown variable is never read (the README lists the sidecar's settings)"
        )


def _explain(exc: ValidationError, overrides: dict[str, Any], file_keys: dict[str, Path]) -> str:
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        parts = error_parts(err)
        if isinstance(parts, str):
            lines.append(parts)
            continue
        field, msg = parts
        if field in overrides:
            label = f"{field} (flag)"
        elif field in file_keys and not any(os.environ.get(name) for name in _env_names(field)):
            label = f"{field} (config file {file_keys[field]})"
            if err["type"] == "extra_forbidden":
                msg = f"unknown setting; known settings: {', '.join(sorted(SidecarSettings.model_fields))}"
        else:
            label = _env_label(field)
        lines.append(f"{label}: {msg}")
    return "invalid sidecar settings: " + "; ".join(lines)
