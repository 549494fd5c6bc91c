"""Money paths: run a caller's function once per idempotency key, in one transaction with the key's record."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import hashlib
import json
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from poolkit.core.translate import is_connect_failure, sqlstate_of
from poolkit.errors import CommitOutcomeUnknown, ConfigError, IdempotencyConflict
from poolkit.pool.driver import ISOLATION_SQL

if TYPE_CHECKING:
    from poolkit.pool.async_pool import Pool
    from poolkit.pool.driver import AsyncDriver, Transaction

DEFAULT_TABLE = "poolkit_idempotency"
Isolation = Literal["read_committed", "repeatable_read", "serializable"]

# serialization_failure and deadlock_detected: PostgreSQL rolled the whole transaction back, so running it
# again from the start is safe and is what the server asks for.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_MAX_KEY_LENGTH = 255


class _Missing:
    """No committed record for the key."""


_MISSING = _Missing()


class _Ambiguous(Exception):
    """COMMIT was sent and the connection broke before its answer: committed or not is unknown."""


class _KeyVanished(Exception):
    """The key conflicted, then its row was gone (deleted by a clean-up job): claim it again."""


def quote_table(table: str) -> str:
    """``table`` or ``schema.table`` as quoted identifiers; anything else is a ConfigError."""
    parts = table.split(".") if isinstance(table, str) else []
    if not 1 <= len(parts) <= 2 or not all(_IDENT.match(p) for p in parts):
        raise ConfigError(
            f"table={table!r}: use a plain table name or schema.table (letters, digits, '_'; at most 63 each)"
        )
    return ".".join(f'"{p}"' for p in parts)


def request_hash(request: Any) -> str:
    """SHA-256 of the request's canonical JSON: what a replay must match to get the recorded result."""
    try:
        text = json.dumps(request, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"request cannot be encoded as JSON ({exc}): pass the request's arguments") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _encode_result(result: Any) -> str:
    try:
        return json.dumps(result, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"the function's result cannot be recorded as JSON ({exc}): return dicts, lists, str, int, float, "
            "bool, None (Decimal, UUID and datetimes become strings)"
        ) from None


async def _fetchrow(driver: AsyncDriver, conn: Any, text: str, *args: Any) -> Any:
    return await driver.fetchrow(conn, driver.sql(text), args)


async def _execute(driver: AsyncDriver, conn: Any, text: str, *args: Any) -> None:
    await driver.execute(conn, driver.sql(text), args, None)


class _Tx:
    """A transaction with an isolation level that is rolled back at most once (and not after its commit)."""

    def __init__(self, driver: AsyncDriver, conn: Any, isolation: Isolation) -> None:
        self.driver, self.conn, self.isolation = driver, conn, isolation
        self._tx: Transaction | None = None
        self._done = False

    async def begin(self) -> None:
        self._tx = await self.driver.begin(self.conn, self.isolation)

    async def commit(self) -> None:
        self._done = True
        if self._tx is not None:
            await self._tx.commit()

    async def rollback(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self._tx is not None:
                await self._tx.rollback()
        except Exception as exc:
            # A broken connection has no transaction left to roll back; the pool discards it.
            if not _connection_lost(exc):
                raise


def _connection_lost(exc: BaseException) -> bool:
    state = sqlstate_of(exc)
    if state is not None:
        return state.startswith("08") or state.startswith("57P")
    return is_connect_failure(exc) or "closed" in str(exc).lower() or "connection" in str(exc).lower()


def _replay(row: Any, expected_hash: str) -> Any:
    stored_hash, result = row[0], row[1]
    if stored_hash != expected_hash:
        raise IdempotencyConflict(
            "this idempotency key was first used with different arguments (the stored request hash differs): "
            "a new request needs a new key, and a retry must send exactly the same arguments"
        )
    return None if result is None else json.loads(result)


async def ensure_table(pool: Pool, *, table: str = DEFAULT_TABLE) -> None:
    """Create the idempotency table if it does not exist (on ``pool.direct()``: DDL belongs on the direct URL).

    Columns: ``key`` (primary key: the unique constraint the whole scheme rests on), ``request_hash``,
    ``result`` (jsonb) and ``created_at`` (for a clean-up job; poolkit never deletes keys).
    """
    quoted = quote_table(table)
    await pool.direct().execute(
        f"CREATE TABLE IF NOT EXISTS {quoted} ("
        "key text PRIMARY KEY, request_hash text NOT NULL, result jsonb, "
        "created_at timestamptz NOT NULL DEFAULT now())"
    )


@dataclass(frozen=True, slots=True)
class _Statements:
    """poolkit's SQL on the idempotency table (the name is validated and quoted by quote_table)."""

    claim: str
    lookup: str
    record: str

    @classmethod
    def for_table(cls, quoted: str) -> _Statements:
        return cls(
            claim=f"INSERT INTO {quoted} (key, request_hash) VALUES ($1, $2) "  # noqa: S608 - quoted identifier
            "ON CONFLICT (key) DO NOTHING RETURNING 1",
            lookup=f"SELECT request_hash, result::text FROM {quoted} WHERE key = $1",  # noqa: S608
            record=f"UPDATE {quoted} SET result = $1::jsonb WHERE key = $2",  # noqa: S608
        )


async def idempotent(
    pool: Pool,
    key: str,
    fn: Callable[[Any], Awaitable[Any]],
    *,
    request: Any = None,
    table: str = DEFAULT_TABLE,
    isolation: Isolation = "read_committed",
    max_attempts: int = 5,
    backoff: float = 0.05,
    max_backoff: float = 2.0,
    check_timeout: float = 30.0,
) -> Any:
    """Run ``await fn(conn)`` at most once per ``key``, in one transaction with the key's record.

    In one transaction on ``conn`` (the driver's connection, with ``isolation``): claim ``key`` in
    ``table`` (its primary key makes a concurrent caller with the same key wait for this transaction),
    run ``fn(conn)``, record its result as JSON, commit. Every statement of ``fn`` must use ``conn``.

    - A replay (the key is already committed) returns the recorded result without calling ``fn``;
      the first call returns the same JSON round trip, so both look alike (Decimal/UUID/datetime
      become strings). A replay with a different ``request`` raises :class:`IdempotencyConflict`.
    - If ``fn`` raises, everything (its writes and the key) rolls back and the error propagates.
    - Serialization failures (40001) and deadlocks (40P01) roll back and run again after an
      exponential backoff with jitter, up to ``max_attempts`` in all; then the driver's error is raised.
    - If the connection breaks during COMMIT the outcome is unknown. poolkit then claims the key again
      on another connection (which waits for the lost transaction if the server still holds it): a
      recorded result is returned, an absent one means nothing committed and the call runs again.
      If that check cannot be made within ``check_timeout`` seconds, :class:`CommitOutcomeUnknown`
      is raised — calling again with the same key is then safe.
    """
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH:
        raise ConfigError(f"key must be a non-empty string of at most {_MAX_KEY_LENGTH} characters")
    if isolation not in ISOLATION_SQL:
        raise ConfigError(f"isolation={isolation!r}: use one of {', '.join(ISOLATION_SQL)}")
    if max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1")
    call = _Call(pool, _Statements.for_table(quote_table(table)), key, request_hash(request), backoff, max_backoff)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call.attempt(fn, isolation)
        except _Ambiguous as ambiguous:
            outcome = await call.check_key(check_timeout)
            if not isinstance(outcome, _Missing):
                return outcome
            # Not committed, so running again cannot move money twice.
            if attempt >= max_attempts:
                cause = ambiguous.__cause__
                raise cause if cause is not None else ambiguous from None
        except _KeyVanished:
            if attempt >= max_attempts:
                raise
        except Exception as exc:
            if sqlstate_of(exc) not in RETRYABLE_SQLSTATES or attempt >= max_attempts:
                raise
        await asyncio.sleep(_delay(attempt, backoff, max_backoff))


def _delay(attempt: int, backoff: float, max_backoff: float) -> float:
    # Jitter keeps callers that failed together from colliding again together.
    return float(min(max_backoff, backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5))  # noqa: S311


@dataclass(frozen=True, slots=True)
class _Call:
    pool: Pool
    sql: _Statements
    key: str
    expected: str
    backoff: float
    max_backoff: float

    async def attempt(self, fn: Callable[[Any], Awaitable[Any]], isolation: Isolation) -> Any:
        driver = self.pool.adapter
        async with self.pool.acquire() as conn:
            tx = _Tx(driver, conn, isolation)
            try:
                await tx.begin()
                claimed = await _fetchrow(driver, conn, self.sql.claim, self.key, self.expected)
                if claimed is None:
                    row = await _fetchrow(driver, conn, self.sql.lookup, self.key)
                    await tx.rollback()
                    if row is None:
                        raise _KeyVanished
                    return _replay(row, self.expected)
                result = await fn(conn)
                text = _encode_result(result)
                await _execute(driver, conn, self.sql.record, text, self.key)
            except BaseException:
                await tx.rollback()
                raise
            try:
                await tx.commit()
            except Exception as exc:
                if _connection_lost(exc):
                    raise _Ambiguous from exc
                raise
            return json.loads(text)

    async def check_key(self, check_timeout: float) -> Any:
        """After an ambiguous COMMIT: the recorded result, or ``_MISSING`` if the lost transaction did not commit."""
        driver = self.pool.adapter
        deadline = time.monotonic() + check_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.pool.acquire() as conn:
                    tx = _Tx(driver, conn, "read_committed")
                    await tx.begin()
                    try:
                        # A plain SELECT would not see a commit still in flight; claiming the key waits for it.
                        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
                        await _execute(driver, conn, f"SET LOCAL lock_timeout = {remaining_ms}")
                        claimed = await _fetchrow(driver, conn, self.sql.claim, self.key, self.expected)
                        row = None if claimed is not None else await _fetchrow(driver, conn, self.sql.lookup, self.key)
                    finally:
                        await tx.rollback()  # the check never keeps its claim: the retry claims for real
                    if claimed is not None:
                        return _MISSING
                    if row is not None:
                        return _replay(row, self.expected)
            except IdempotencyConflict:
                raise
            except Exception as exc:
                if time.monotonic() >= deadline or not _connection_lost(exc):
                    raise CommitOutcomeUnknown(
                        "the connection was lost during COMMIT and the idempotency key could not be checked "
                        f"({type(exc).__name__}); the money may or may not have moved. Call again with the same "
                        "key and arguments: a committed call is replayed, an uncommitted one runs"
                    ) from exc
            await asyncio.sleep(_delay(attempt, self.backoff, self.max_backoff))


__all__ = ["DEFAULT_TABLE", "RETRYABLE_SQLSTATES", "ensure_table", "idempotent", "quote_table", "request_hash"]
