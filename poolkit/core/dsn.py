"""PostgreSQL connection URLs: parsing, pooler detection inputs, and redaction."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from poolkit.errors import ConfigError

_SECRET_PARAMS = frozenset({"password", "sslpassword", "passfile"})
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True, slots=True)
class Dsn:
    """A parsed ``postgresql://`` URL.

    The password is kept out of ``repr`` and ``str``; use :meth:`redacted` to show a URL
    and :meth:`to_url` only to hand it to a driver.
    """

    host: str
    port: int
    user: str
    database: str
    password: str | None = field(default=None, repr=False)
    params: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str, *, setting: str = "url") -> Dsn:
        """Parse ``url``; errors name ``setting`` and never echo the URL (it may hold a password)."""
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"{setting} is empty: set it to a postgresql://user:password@host:port/db URL")
        try:
            parts = urlsplit(url.strip())
        except ValueError:  # e.g. "Invalid IPv6 URL": an unbalanced "[" in the host
            raise ConfigError(
                f"{setting} is not a valid URL (check the brackets around an IPv6 host and percent-encode "
                "special characters in the password); expected postgresql://user:password@host:port/db"
            ) from None
        if parts.scheme not in ("postgres", "postgresql"):
            shown = parts.scheme or "(none)"
            raise ConfigError(f"{setting} has scheme {shown!r}; expected postgresql://user:password@host:port/db")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ConfigError(f"{setting} has a port that is not a number from 1 to 65535") from None
        params = tuple(parse_qsl(parts.query, keep_blank_values=True))
        host = unquote(parts.hostname or "")
        query_host = dict(params).get("host", "")
        if not host and query_host:
            host = query_host  # libpq style: ?host=/var/run/postgresql for a Unix socket
        if not host:
            raise ConfigError(f"{setting} has no host: expected postgresql://user:password@HOST:port/db")
        user = unquote(parts.username or "")
        if not user:
            raise ConfigError(f"{setting} has no user name: expected postgresql://USER:password@host:port/db")
        database = unquote(parts.path.lstrip("/")) or user
        password = unquote(parts.password) if parts.password is not None else None
        params = tuple((k, v) for k, v in params if k != "host")
        sslmode = dict(params).get("sslmode")
        if sslmode is not None and sslmode not in SSL_MODES:
            raise ConfigError(f"{setting} has sslmode={sslmode!r}; use one of {', '.join(SSL_MODES)}")
        return cls(host=host, port=port or 5432, user=user, database=database, password=password, params=params)

    @property
    def query(self) -> dict[str, str]:
        """The URL's query parameters (later duplicates win, as in libpq)."""
        return dict(self.params)

    @property
    def is_unix_socket(self) -> bool:
        return self.host.startswith("/")

    @property
    def is_loopback(self) -> bool:
        """True for a Unix socket, ``localhost`` or a loopback address."""
        if self.is_unix_socket or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    def with_params(self, **params: str | None) -> Dsn:
        """A copy with query parameters set (``None`` removes one)."""
        merged = dict(self.params)
        for key, value in params.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return replace(self, params=tuple(merged.items()))

    def without_params(self, *names: str) -> Dsn:
        return replace(self, params=tuple((k, v) for k, v in self.params if k not in names))

    def to_url(self) -> str:
        """The full URL including the password: for drivers only, never for display."""
        auth = quote(self.user, safe="")
        if self.password is not None:
            auth += ":" + quote(self.password, safe="")
        return self._format(auth, self.params)

    def redacted(self) -> str:
        """The URL with the password and any secret parameter replaced by ``***``."""
        auth = quote(self.user, safe="") + (":***" if self.password is not None else "")
        params = tuple((k, "***" if k in _SECRET_PARAMS else v) for k, v in self.params)
        return self._format(auth, params)

    def _format(self, auth: str, params: tuple[tuple[str, str], ...]) -> str:
        if self.is_unix_socket:
            netloc = f"{auth}@"
            params = (*params, ("host", self.host))
        else:
            host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
            netloc = f"{auth}@{host}:{self.port}"
        query = f"?{urlencode(params)}" if params else ""
        return f"postgresql://{netloc}/{quote(self.database, safe='')}{query}"

    def __str__(self) -> str:
        return self.redacted()


def redact(text: str, *secrets: str | None) -> str:
    """Replace every occurrence of each non-empty secret in ``text`` with ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
