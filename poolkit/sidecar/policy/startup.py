"""Sans-IO: a client's startup parameters checked as PostgreSQL checks them at login, and their canonical values.

PostgreSQL applies the settings in a startup packet before it says ReadyForQuery: a value it rejects
fails the login (``FATAL: invalid value for parameter "client_encoding": "bogus"``), and the values it
reports with ParameterStatus are its own spelling (``eucjp`` becomes ``EUC_JP``, ``europe/paris``
becomes ``Europe/Paris``). The sidecar greets a client before any server connection is its own, so it
asks the upstream once per new (name, value): :func:`check_query` sets each one on a server connection
for the length of one implicit transaction and reads back what ``set_config`` returns, which is the
setting's canonical value or the error PostgreSQL would have refused the login with. The answers are
kept in a :class:`StartupChecks` cache, so a client whose parameters were seen before costs no round trip.

Settings are applied with ``set_config(name, value, ...)``, which takes the value as the startup packet
does: ``SET search_path TO 'a,b'`` would set one schema named ``a,b``, the startup packet sets two.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from poolkit.sidecar.policy.pooling import quote_literal, valid_setting_name

# Distinct (name, value) pairs remembered; each is a few dozen bytes. A client population that sends more
# distinct values than this (a unique application_name per connection) costs a round trip per login.
CACHE_LIMIT: Final = 4096
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


@dataclass(frozen=True, slots=True)
class Rejection:
    """The upstream's ErrorResponse for a startup parameter: the client's login fails with it (FATAL)."""

    code: str
    message: str
    detail: str | None = None
    hint: str | None = None


def _identifier(name: str) -> str:
    if not valid_setting_name(name):
        raise ValueError(f"invalid setting name {name!r}")
    return f'"{name.lower()}"'  # quoted: a setting named like a keyword; PostgreSQL's own names are lower case


def check_query(pairs: Sequence[tuple[str, str]]) -> str:
    """One simple query that validates ``pairs`` and returns one row per pair: the canonical value.

    Names as the client spelled them: PostgreSQL's error messages repeat that spelling.

    Every statement runs in the query's implicit transaction with a transaction-local effect, so the server
    session is unchanged afterwards, and the first rejected pair aborts the query with PostgreSQL's error.
    Each setting is first put back to its session default inside the transaction: some values are read
    relative to the current one (``DateStyle=ISO`` keeps the current day/month order), and at login
    PostgreSQL reads them relative to the default, not to what another client of this server connection set.
    """
    parts = []
    for name, value in pairs:
        parts.append(f"SET LOCAL {_identifier(name)} TO DEFAULT")
        parts.append(f"SELECT pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, true)")
    return "; ".join(parts)


def sync_statements(changes: Sequence[tuple[str, str | None]]) -> str:
    """One simple query giving a server session these settings (a value) or their defaults (``None``).

    ``set_config`` rather than ``SET``: it takes the value as the startup packet does (see the module doc).
    """
    parts = []
    for name, value in changes:
        if value is None:
            parts.append(f"RESET {_identifier(name)}")
        else:
            _identifier(name)
            parts.append(f"SELECT pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)")
    return "; ".join(parts)


def first_column(data_row: bytes) -> str | None:
    """The first value of a DataRow body (text format), ``None`` for SQL NULL."""
    if len(data_row) < 6 or _I16.unpack_from(data_row, 0)[0] < 1:
        return None
    length = _I32.unpack_from(data_row, 2)[0]
    if length < 0:
        return None
    return data_row[6 : 6 + length].decode("utf-8", "replace")


def rejection(error: Mapping[str, str]) -> Rejection:
    """The login failure for the ErrorResponse fields a check query got."""
    return Rejection(
        code=error.get("C", "22023"),
        message=error.get("M", "invalid startup parameter"),
        detail=error.get("D"),
        hint=error.get("H"),
    )


class StartupChecks:
    """What the upstream made of each (name, value) clients sent at startup: its canonical value.

    Only values the upstream accepted are kept (a rejected one costs its client a round trip again, and a
    later ``ALTER SYSTEM``/extension may make it valid). Bounded by :data:`CACHE_LIMIT`, and forgotten when
    the upstream changes (``generation``, the pool's, which a reload to a new URL bumps).
    """

    __slots__ = ("_known", "generation", "limit")

    def __init__(self, limit: int = CACHE_LIMIT) -> None:
        self._known: dict[tuple[str, str], str] = {}
        self.generation = 0
        self.limit = limit

    def __len__(self) -> int:
        return len(self._known)

    def resolve(self, wanted: Mapping[str, str], generation: int) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """``wanted`` with each known value canonical, and the (name, value) pairs still to check, in order."""
        if generation != self.generation:
            self._known.clear()
            self.generation = generation
        known = self._known
        canonical: dict[str, str] = {}
        unknown: list[tuple[str, str]] = []
        for name, value in wanted.items():
            found = known.get((name, value))
            if found is None:
                unknown.append((name, value))
                canonical[name] = value
            else:
                canonical[name] = found
        return canonical, unknown

    def learn(self, pairs: Sequence[tuple[str, str]], values: Sequence[str | None], generation: int) -> dict[str, str]:
        """Remember what a check query returned for ``pairs`` (one value per pair); the canonical values by name."""
        if len(values) != len(pairs):
            raise ValueError(f"a check of {len(pairs)} startup parameters returned {len(values)} values")
        found: dict[str, str] = {}
        remember = generation == self.generation
        if remember and len(self._known) + len(pairs) > self.limit:
            self._known.clear()  # rarely reached (see CACHE_LIMIT): simpler than tracking recency
        for (name, value), canonical in zip(pairs, values, strict=True):
            text = value if canonical is None else canonical
            found[name] = text
            if remember:
                self._known[(name, value)] = text
        return found
