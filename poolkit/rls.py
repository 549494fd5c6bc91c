"""RLS-scoped sessions: one transaction that runs as a Supabase-style user (JWT claims + role), and nothing after it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from poolkit.errors import ConfigError

if TYPE_CHECKING:
    from poolkit.driver import AsyncDriver, Transaction


class AsyncPoolLike(Protocol):
    """What :func:`as_user` needs of an async pool (``poolkit.Pool``)."""

    @property
    def adapter(self) -> AsyncDriver: ...
    def acquire(self, *, timeout: float | None = None) -> AbstractAsyncContextManager[Any]: ...


class SyncPoolLike(Protocol):
    """What :func:`as_user_sync` needs of a sync pool (``poolkit.SyncPool``)."""

    def acquire(self, *, timeout: float | None = None) -> AbstractContextManager[Any]: ...


# PostgREST/Supabase read these: `auth.uid()` reads request.jwt.claim.sub in older projects and
# request.jwt.claims ->> 'sub' in newer ones, so both are set.
CLAIMS_SETTING = "request.jwt.claims"
SUB_SETTING = "request.jwt.claim.sub"

_MAX_IDENTIFIER_BYTES = 63

# One round trip for both settings. `true` = is_local: the values end with the transaction, which is
# what makes this safe through a transaction pooler (the next client on the server connection sees '').
_SET_CLAIMS = f"SELECT set_config('{CLAIMS_SETTING}', $1, true), set_config('{SUB_SETTING}', $2, true)"
_SET_CLAIMS_PSYCOPG = f"SELECT set_config('{CLAIMS_SETTING}', %s, true), set_config('{SUB_SETTING}', %s, true)"


def quote_role(role: str) -> str:
    """``role`` as a quoted SQL identifier, after checking it is a usable role name.

    ``SET ROLE`` takes no bind parameter, so the name is quoted here; quoting (not a character
    allow-list) is what stops injection, the checks only turn obvious mistakes into clear errors.
    """
    if not isinstance(role, str) or not role.strip():
        raise ConfigError("role is empty: pass a role name such as 'authenticated' or 'anon', or role=None")
    if "\x00" in role:
        raise ConfigError("role contains a NUL character, which PostgreSQL identifiers cannot hold")
    if len(role.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ConfigError(f"role is {len(role.encode())} bytes long; PostgreSQL role names are at most 63 bytes")
    if role.lower() in ("none", "default", "public", "session_user", "current_user"):
        # `SET ROLE NONE` resets; quoted, these would name a (nonexistent) role — either way not what is meant.
        raise ConfigError(f"role {role!r} is a keyword, not a role: pass the role to run as, or role=None")
    return '"' + role.replace('"', '""') + '"'


def claims_json(claims: Mapping[str, Any] | None) -> tuple[str, str]:
    """The claims as JSON text and the ``sub`` claim as text ('' when absent)."""
    if claims is None:
        return "", ""
    if not isinstance(claims, Mapping):
        raise ConfigError(f"claims must be a mapping (the decoded JWT payload), not {type(claims).__name__}")
    try:
        text = json.dumps(dict(claims), separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"claims cannot be encoded as JSON ({exc}); pass the decoded JWT payload") from None
    sub = claims.get("sub")
    return text, "" if sub is None else str(sub)


class UserSession:
    """``async with`` body of :func:`as_user`: yields the driver's connection inside the scoped transaction."""

    def __init__(self, pool: AsyncPoolLike, claims: Mapping[str, Any] | None, role: str | None) -> None:
        self._pool = pool
        self._claims, self._sub = claims_json(claims)
        self._role = quote_role(role) if role is not None else None
        self._acquire: Any = None
        self._conn: Any = None
        self._tx: Transaction | None = None

    async def __aenter__(self) -> Any:
        driver = self._pool.adapter
        acquire = self._pool.acquire()
        conn = await acquire.__aenter__()
        try:
            self._tx = await driver.begin(conn)
            await driver.execute(conn, driver.sql(_SET_CLAIMS), (self._claims, self._sub), None)
            if self._role is not None:
                await driver.execute(conn, f"SET LOCAL ROLE {self._role}", (), None)
        except BaseException as exc:
            await self._finish(exc)
            await acquire.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._acquire, self._conn = acquire, conn
        return conn

    async def _finish(self, exc: BaseException | None) -> None:
        tx, self._tx = self._tx, None
        if tx is None:
            return
        if exc is None:
            await tx.commit()
        else:
            await tx.rollback()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        acquire, self._acquire = self._acquire, None
        self._conn = None
        try:
            await self._finish(exc)
        except BaseException as failure:
            await acquire.__aexit__(type(failure), failure, failure.__traceback__)
            raise
        await acquire.__aexit__(exc_type, exc, tb)


class SyncUserSession:
    """``with`` body of :func:`as_user_sync`: the psycopg connection inside the scoped transaction."""

    def __init__(self, pool: SyncPoolLike, claims: Mapping[str, Any] | None, role: str | None) -> None:
        self._pool = pool
        self._claims, self._sub = claims_json(claims)
        self._role = quote_role(role) if role is not None else None
        self._acquire: Any = None
        self._tx: Any = None

    def __enter__(self) -> Any:
        acquire = self._pool.acquire()
        conn = acquire.__enter__()
        try:
            tx = conn.transaction()
            tx.__enter__()
            self._tx = tx
            conn.execute(_SET_CLAIMS_PSYCOPG, (self._claims, self._sub))
            if self._role is not None:
                conn.execute(f"SET LOCAL ROLE {self._role}")
        except BaseException as exc:
            self._finish(exc)
            acquire.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._acquire = acquire
        return conn

    def _finish(self, exc: BaseException | None) -> None:
        tx, self._tx = self._tx, None
        if tx is not None:
            tx.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        acquire, self._acquire = self._acquire, None
        try:
            self._finish(exc)
        except BaseException as failure:
            acquire.__exit__(type(failure), failure, failure.__traceback__)
            raise
        acquire.__exit__(exc_type, exc, tb)


def as_user(
    pool: AsyncPoolLike, claims: Mapping[str, Any] | None, *, role: str | None = "authenticated"
) -> UserSession:
    """A transaction that runs as a Supabase-style user, for row-level-security policies.

    ``async with as_user(pool, {"sub": user_id, "role": "authenticated"}) as conn:`` begins a
    transaction, sets ``request.jwt.claims`` (the claims as JSON) and ``request.jwt.claim.sub``
    with ``set_config(..., true)``, and runs ``SET LOCAL ROLE <role>`` (``role=None`` keeps the
    login role). The block's statements run under the policies; the transaction commits when the
    block ends and rolls back if it raises. Every setting is transaction-local, so nothing reaches
    the next user of the server connection — which is what makes this safe through a transaction
    pooler. The login role needs membership in ``role`` (``GRANT authenticated TO app``).
    """
    return UserSession(pool, claims, role)


def as_user_sync(
    pool: SyncPoolLike, claims: Mapping[str, Any] | None, *, role: str | None = "authenticated"
) -> SyncUserSession:
    """The sync variant of :func:`as_user` for a :class:`poolkit.SyncPool` (``with ... as conn``)."""
    return SyncUserSession(pool, claims, role)


__all__ = ["CLAIMS_SETTING", "SUB_SETTING", "SyncUserSession", "UserSession", "as_user", "as_user_sync", "quote_role"]
