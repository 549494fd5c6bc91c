"""RLS-scoped sessions on a pool: one transaction that runs as a Supabase-style user, and nothing after it.

``rls_async.py`` is the source and ``rls_sync.py`` (``SyncUserSession``, ``as_user_sync``) is generated from it by
``scripts/async_to_sync``. ``poolkit.rls`` is where both are imported from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from poolkit.pool.rls_claims import SET_CLAIMS, claims_json, quote_role


class AsyncTransactionLike(Protocol):
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...


class AsyncSessionDriver(Protocol):
    """What a session needs of the pool's driver adapter (``pool.adapter``)."""

    def sql(self, text: str) -> str: ...
    def execute(self, conn: Any, query: Any, args: Sequence[Any], timeout: float | None) -> Any: ...
    async def begin(self, conn: Any, isolation: str | None = None) -> AsyncTransactionLike: ...


class AsyncSessionPool(Protocol):
    """What :func:`as_user` (``as_user_sync``) needs of a pool."""

    @property
    def adapter(self) -> AsyncSessionDriver: ...
    def acquire(self, *, timeout: float | None = None) -> AbstractAsyncContextManager[Any]: ...


class UserSession:
    """The body of an ``as_user`` / ``as_user_sync`` block: the driver's connection inside the scoped transaction."""

    def __init__(self, pool: AsyncSessionPool, claims: Mapping[str, Any] | None, role: str | None) -> None:
        self._pool = pool
        self._claims, self._sub = claims_json(claims)
        self._role = quote_role(role) if role is not None else None
        self._acquire: Any = None
        self._tx: AsyncTransactionLike | None = None

    async def __aenter__(self) -> Any:
        driver = self._pool.adapter
        acquire = self._pool.acquire()
        conn = await acquire.__aenter__()
        try:
            self._tx = await driver.begin(conn)
            await driver.execute(conn, driver.sql(SET_CLAIMS), (self._claims, self._sub), None)
            if self._role is not None:
                await driver.execute(conn, f"SET LOCAL ROLE {self._role}", (), None)
        except BaseException as exc:
            await self._finish(exc)
            await acquire.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._acquire = acquire
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
        try:
            await self._finish(exc)
        except BaseException as failure:
            await acquire.__aexit__(type(failure), failure, failure.__traceback__)
            raise
        await acquire.__aexit__(exc_type, exc, tb)


def as_user(
    pool: AsyncSessionPool, claims: Mapping[str, Any] | None, *, role: str | None = "authenticated"
) -> UserSession:
    """A transaction that runs as a Supabase-style user, for row-level-security policies.

    ``async with as_user(pool, {"sub": user_id, "role": "authenticated"}) as conn:`` (``with
    as_user_sync(...)`` for a ``SyncPool``) begins a transaction, sets ``request.jwt.claims`` (the
    claims as JSON) and ``request.jwt.claim.sub`` with ``set_config(..., true)``, and runs ``SET LOCAL
    ROLE <role>`` (``role=None`` keeps the login role). The block's statements run under the policies;
    the transaction commits when the block ends and rolls back if it raises. Every setting is
    transaction-local, so nothing reaches the next user of the server connection — which is what makes
    this safe through a transaction pooler. The login role needs membership in ``role`` (``GRANT
    authenticated TO app``).
    """
    return UserSession(pool, claims, role)
