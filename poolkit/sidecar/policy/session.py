"""Pure session decisions: does a statement pin its client, undo a pin, or send its transaction direct?

The sidecar hands out server connections per transaction, so session state a client creates (a
plain ``SET``, ``SET ROLE``, ``LISTEN``, a temporary table, ...) would stay on a server connection the
next client gets. This module decides, from SQL text alone, what the relay must do about it:

* **pin** (:data:`PIN_REASONS`): the client keeps its server connection until it disconnects or
  undoes the state (then the server is reset before anyone else gets it);
* **clear**: the statement undoes pinned state (``DISCARD ALL``; the reset asyncpg's pool sends on
  release, ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;``, clears
  everything that reset can, but not a role, SQL prepared statements or temporary tables);
* **route** (:data:`ROUTE_REASONS`): introspection, DDL and server-side ``COPY`` run their
  transaction on the direct upstream when one is configured;
* nothing, for almost every statement: :func:`quick_nothing` says so without tokenising.

What is classified is :func:`poolkit.sql.routing.classify`'s business; this module only refines its
session reasons per statement (which ``SET`` needs a pin, which statement undoes one), reusing
routing's lexer so there is one reading of SQL in poolkit.

Settings PostgreSQL reports with ParameterStatus and the sidecar already carries per client
(:data:`poolkit.sidecar.policy.pooling.TRACKED_PARAMETERS`: TimeZone, DateStyle, client_encoding, ...) need
no pin: the relay records the new value from the server's ParameterStatus and sets it on whichever
server connection the client gets next, and resets it for the next client. Every other setting is
invisible to the relay after the fact, so a plain ``SET`` of it pins.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Final

from poolkit.sidecar.policy.pooling import TRACKED_PARAMETERS
from poolkit.sql import routing
from poolkit.sql.routing import Token

__all__ = [
    "CLEAR_ALL",
    "LITERAL_TAIL",
    "NOTHING",
    "PIN_REASONS",
    "POOLER_RESTORED",
    "ROUTE_REASONS",
    "TAP_LIMIT",
    "Effect",
    "StatementTap",
    "chunk_effect",
    "decide",
    "no_session_hint",
    "no_session_message",
    "pin_limit_hint",
    "pin_limit_message",
    "quick_nothing",
    "statement_text",
]

#: Reasons a client is pinned (``routing.REASONS`` that leave session state), in routing's priority order.
PIN_REASONS: Final = ("set_role", "session_set", "advisory_lock", "listen", "prepare", "hold_cursor", "temp_table")
#: Reasons a transaction goes to the direct upstream without pinning its client.
ROUTE_REASONS: Final = ("ddl", "catalog", "copy")
#: Every pin reason: what ``DISCARD ALL`` undoes.
CLEAR_ALL: Final = frozenset(PIN_REASONS)

#: The tracked settings a transaction pooler itself restores for each of its clients on whatever
#: backend it hands them (PgBouncer's parameter cache: client_encoding, DateStyle, TimeZone,
#: standard_conforming_strings, application_name). Other tracked settings (IntervalStyle) would stay
#: behind on a backend for other clients, so there a SET of them is a session feature.
POOLER_RESTORED: Final = frozenset(
    {"client_encoding", "datestyle", "timezone", "standard_conforming_strings", "application_name"}
)


@dataclass(frozen=True, slots=True)
class Effect:
    """What a statement (or several, in order) asks of the relay.

    ``route`` is a :data:`ROUTE_REASONS` value when the transaction should run on the direct
    upstream; ``pins`` the session reasons it creates (first one first); ``clears`` the reasons it
    undoes. Applied to a client's pin reasons ``r`` it gives ``(r - clears) | pins``.
    """

    route: str = ""
    pins: tuple[str, ...] = ()
    clears: frozenset[str] = frozenset()
    # Tracked settings it changes that a transaction pooler does not carry from backend to backend
    # (see POOLER_RESTORED): a session feature there, nothing to do where the upstream keeps sessions.
    sets: frozenset[str] = frozenset()

    @property
    def nothing(self) -> bool:
        """True when the relay has nothing to do."""
        return not (self.route or self.pins or self.clears or self.sets)

    def then(self, later: Effect) -> Effect:
        """This effect followed by ``later`` (statement order matters: a later reset undoes a pin)."""
        if later.nothing:
            return self
        if self.nothing:
            return later
        pins = tuple(p for p in self.pins if p not in later.clears)
        pins += tuple(p for p in later.pins if p not in pins)
        return Effect(self.route or later.route, pins, self.clears | later.clears, self.sets | later.sets)

    def behind_transaction_pooler(self) -> Effect:
        """This effect where the upstream is a transaction pooler: what it cannot carry needs a session."""
        if not self.sets:
            return self
        return Effect(
            self.route, (*self.pins, "session_set") if "session_set" not in self.pins else self.pins, self.clears
        )

    def apply(self, reasons: frozenset[str]) -> frozenset[str]:
        """A client's pin reasons after this effect."""
        if not (self.clears or self.pins):
            return reasons
        return (reasons - self.clears) | frozenset(self.pins)


NOTHING: Final = Effect()
_PIN = {reason: Effect(pins=(reason,)) for reason in PIN_REASONS}
_ROUTE = {reason: Effect(route=reason) for reason in ROUTE_REASONS}
_CLEAR = {reason: Effect(clears=frozenset({reason})) for reason in PIN_REASONS}
_CLEAR_EVERYTHING = Effect(clears=CLEAR_ALL)

_ADVISORY_LOCKS = frozenset(
    {"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"}
)

# --------------------------------------------------------------------------------------------
# The hot path: most statements (application DML, transaction control) have no session effect.
# This answers that from the text without tokenising, so pgbench -S (a new literal every time,
# which defeats any cache) pays well under a microsecond. Every reason routing can find inside a
# query needs one of the substrings quick_nothing looks for (the set routing's own fast path relies on,
# routing._DML_TRIGGERS, which tests check), and a statement that starts with one of _PLAIN_HEADS has no
# other way to carry session state.

_PLAIN_HEADS = (
    "select",
    "insert",
    "update",
    "delete",
    "with",
    "values",
    "table",
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "fetch",
    "move",
    "show",
)
_STATEMENT_END = " \t\r\n\f;"


# Heads of a plain statement that also cannot open or end a transaction block: one such statement sent
# on its own is a whole implicit transaction, so another client's request may run right after it
# (pipelining across clients, server.py).
_AUTOCOMMIT_HEADS = (b"select", b"insert", b"update", b"delete", b"with", b"values", b"table")


def autocommit_head(sql: bytes) -> bool:
    """True when a statement :func:`quick_nothing` found plain is also no transaction control."""
    head = sql.lstrip()[:7].lower()
    for word in _AUTOCOMMIT_HEADS:
        if head.startswith(word):
            rest = head[len(word) : len(word) + 1]
            return not rest or not (rest.isalnum() or rest == b"_")
    return False


#: What may follow a statement found plain for a new statement to be plain too: a number, ``;``, space.
#: (Digits cannot spell a trigger, a head or a second statement.) The relay keeps the last plain
#: statement without this tail and compares the next one to it before anything else.
LITERAL_TAIL: Final = b"0123456789.; \t\r\n"


def quick_nothing(sql: str) -> bool:
    """True when ``sql`` certainly has no session effect (checked without tokenising).

    False means "look closer" (:func:`decide`), not "has an effect".
    """
    low = sql.lower()
    head = low.lstrip()
    if not head.startswith(_PLAIN_HEADS):
        return False
    if "pg_" in low or "set_config" in low or "information_schema" in low or "format_type" in low:
        return False
    if "_description" in low:
        return False
    semicolon = low.find(";")
    if semicolon >= 0 and low[semicolon:].strip(_STATEMENT_END):
        return False  # several statements
    # `SELECT ... INTO t` creates a table; INSERT/MERGE INTO are plain DML.
    return "into" not in low or head.startswith(("insert", "merge"))


# --------------------------------------------------------------------------------------------
# The closer look, per statement, on routing's tokens.

_CACHE_MAX_TEXT = 16_384


def decide(sql: str) -> Effect:
    """The :class:`Effect` of ``sql`` (one or more statements). Pure; cached by text like routing."""
    if len(sql) > _CACHE_MAX_TEXT:
        return _decide(sql)
    return _decide_cached(sql)


@functools.lru_cache(maxsize=4096)
def _decide_cached(sql: str) -> Effect:
    return _decide(sql)


def _decide(sql: str) -> Effect:
    if not routing.classify(sql).direct and "close" not in sql.lower():
        return NOTHING  # CLOSE ALL (a clear) is the only statement routing calls pooled that matters here
    effect = NOTHING
    for tokens in routing.statements(sql):
        effect = effect.then(_statement_effect(tokens))
    return effect


def _word(tokens: list[Token], index: int) -> str:
    """The lower-cased word at ``index`` (``""`` for anything else or past the end)."""
    if index < len(tokens) and tokens[index][0] == "w":
        return tokens[index][1]
    return ""


def _statement_effect(tokens: list[Token]) -> Effect:  # noqa: PLR0911, PLR0912 - one return per statement kind, in the order they must be told apart
    head, second = _word(tokens, 0), _word(tokens, 1)
    if head == "close":
        return _CLEAR["hold_cursor"] if second == "all" else NOTHING
    reason = routing.statement_reason(tokens)
    if not reason:
        return NOTHING
    if reason in _ROUTE:
        return _ROUTE[reason]
    if head == "discard":
        if second == "all":
            return _CLEAR_EVERYTHING
        return _CLEAR["temp_table"] if second in ("temp", "temporary") else NOTHING
    if head == "reset":
        # RESET ALL undoes every setting; RESET one_setting may leave others set (and undoes
        # nothing on a server connection nobody pinned). RESET ROLE / SESSION AUTHORIZATION keep
        # the pin: after SET SESSION AUTHORIZATION, RESET ROLE leaves the session user changed.
        return _CLEAR["session_set"] if second == "all" else NOTHING
    if head == "set":
        return _set_effect(tokens)
    if head == "unlisten":
        return _CLEAR["listen"] if tokens[1:2] == [("o", "*")] else NOTHING
    if head == "deallocate":
        last = _word(tokens, 2) if second == "prepare" else second
        return _CLEAR["prepare"] if last == "all" else NOTHING
    if head == "execute":
        return NOTHING  # runs a statement PREPAREd earlier: the PREPARE pinned, if it happened here
    if reason == "advisory_lock":
        names = {value for kind, value in tokens if kind in ("w", "q")}
        if names & _ADVISORY_LOCKS:
            return _PIN[reason]
        # Unlocking takes nothing; pg_advisory_unlock_all() releases every session lock.
        return _CLEAR[reason] if "pg_advisory_unlock_all" in names else NOTHING
    if reason == "temp_table" and _on_commit_drop(tokens):
        return NOTHING  # lives for one transaction
    return _PIN.get(reason, NOTHING)


def _on_commit_drop(tokens: list[Token]) -> bool:
    words = [value for kind, value in tokens if kind == "w"]
    return any(words[i : i + 3] == ["on", "commit", "drop"] for i in range(len(words) - 2))


def _set_effect(tokens: list[Token]) -> Effect:
    """``SET [SESSION] ...`` (routing has already answered ``SET LOCAL`` and ``SET TRANSACTION``)."""
    i = 2 if _word(tokens, 1) == "session" else 1
    target = _word(tokens, i)
    if target == "role" or (i == 2 and target == "authorization"):
        value = _word(tokens, i + 1)
        # Back to the login role on a connection nobody pinned: nothing to keep.
        return NOTHING if value in ("none", "default") else _PIN["set_role"]
    if target == "time" and _word(tokens, i + 1) == "zone":
        name, value_at = "timezone", i + 2
    elif target == "names":
        name, value_at = "client_encoding", i + 1
    elif i < len(tokens) and tokens[i][0] in ("w", "q"):
        name, value_at = tokens[i][1].lower(), i + 1
        while tokens[value_at : value_at + 1] == [("o", ".")] and value_at + 1 < len(tokens):
            name += "." + tokens[value_at + 1][1].lower()  # a custom setting: app.tenant
            value_at += 2
        if _word(tokens, value_at) == "to" or tokens[value_at : value_at + 1] == [("o", "=")]:
            value_at += 1
    else:
        return _PIN["session_set"]
    if _word(tokens, value_at) == "default" and value_at == len(tokens) - 1:
        return NOTHING  # SET x TO DEFAULT is RESET x
    if name in routing.PLANNER_ONLY_SETTINGS:
        return NOTHING  # changes plans, never answers
    if name in TRACKED_PARAMETERS:
        # Reported by ParameterStatus: the relay carries it for this client; a transaction pooler
        # carries only some (POOLER_RESTORED) across backends itself.
        return NOTHING if name in POOLER_RESTORED else Effect(sets=frozenset({name}))
    return _PIN["session_set"]


# --------------------------------------------------------------------------------------------
# SQL out of client chunks. FrontendScanner records where the first and the last Query/Parse of a
# chunk start; these helpers read their text (a Parse body starts with the statement name), walk a
# chunk that held several, and keep the start of one whose text continues in later chunks.

_U32 = struct.Struct("!I")
_PARSE = ord("P")
_QUERY = ord("Q")
#: How much of one statement is kept while it arrives in pieces; longer ones are decided on this much.
TAP_LIMIT: Final = 65_536


def statement_text(chunk: bytes, body: int, end: int) -> tuple[str, bool]:
    """The SQL of the Query/Parse whose body starts at ``body`` (``chunk[body-5]`` is its type).

    Returns ``(text, complete)``; ``complete`` is false when the text runs past ``end``.
    """
    start = body
    if chunk[body - 5] == _PARSE:
        name_end = chunk.find(b"\x00", body, end)
        if name_end < 0:
            return "", False
        start = name_end + 1
    stop = chunk.find(b"\x00", start, end)
    if stop < 0:
        return chunk[start:end].decode("utf-8", "replace"), False
    return chunk[start:stop].decode("utf-8", "replace"), True


def _text_effect(text: str) -> Effect:
    return NOTHING if quick_nothing(text) else decide(text)


class StatementTap:
    """The start of a Query/Parse whose body continues in later chunks (rare: big or split messages).

    ``head`` is the message's type byte and length word, ``body`` what arrived of its body so far,
    ``missing`` how many body bytes are still to come.
    """

    __slots__ = ("body", "head", "missing")

    def __init__(self, head: bytes, body: bytes, missing: int) -> None:
        self.head = head
        self.body = body
        self.missing = missing

    def feed(self, data: bytes) -> Effect | None:
        """Take this message's next bytes from the start of ``data``; its effect once complete, else None.

        A statement longer than :data:`TAP_LIMIT` is decided on its first :data:`TAP_LIMIT` bytes.
        """
        take = min(self.missing, len(data), max(0, TAP_LIMIT - len(self.body)))
        self.body += data[:take]
        self.missing -= min(self.missing, len(data))
        if self.missing > 0 and len(self.body) < TAP_LIMIT:
            return None
        message = self.head + self.body
        text, _ = statement_text(message, 5, len(message))
        return _text_effect(text)


def _tap_for(chunk: bytes, body: int, end: int) -> StatementTap:
    (length,) = _U32.unpack_from(chunk, body - 4)
    return StatementTap(chunk[body - 5 : body], chunk[body:end], body - 4 + length - end)


def chunk_effect(chunk: bytes, first: int, last: int, end: int) -> tuple[Effect, Effect, StatementTap | None]:
    """The effect of every Query/Parse in ``chunk``, from the body at ``first`` to the one at ``last``.

    ``end`` is where the last one's body ends within ``chunk`` (``FrontendScanner.sql_end``).
    Returns ``(effect, prefix_route, tap)``: when the last statement continues in later chunks,
    ``tap`` collects it and ``prefix_route`` is the route its first part already asks for (the
    pool must be chosen now); its pins and clears come from ``tap`` once it is complete.
    """
    effect = NOTHING
    body = first
    n = len(chunk)
    while body < last:
        # Every message before ``last`` is whole: the scanner saw ``last``'s header after it.
        (length,) = _U32.unpack_from(chunk, body - 4)
        if chunk[body - 5] in (_QUERY, _PARSE):
            text, _ = statement_text(chunk, body, body - 4 + length)
            effect = effect.then(_text_effect(text))
        body += length + 1
    text, complete = statement_text(chunk, last, end)
    if complete or end < n:
        return effect.then(_text_effect(text)), NOTHING, None
    prefix = _text_effect(text)
    return effect, Effect(route=prefix.route) if prefix.route else NOTHING, _tap_for(chunk, last, end)


# --------------------------------------------------------------------------------------------
# The error a client gets when max_pinned_clients is reached.


def pin_limit_message(*, pool: str, limit: int, reason: str) -> str:
    """ErrorResponse text when a statement would pin one client more than ``max_pinned_clients``."""
    return (
        f'max_pinned_clients={limit} reached on pool "{pool}": this statement ({reason}) would pin its '
        "client to a server connection of its own, so it was not run"
    )


def no_session_message(reason: str) -> str:
    """ErrorResponse text when a statement needs a session and the only upstream is a transaction pooler."""
    return (
        f"this statement ({reason}) needs a database session of its own, but the sidecar's upstream is a "
        "transaction pooler, where each transaction may run on another backend, so it was not run"
    )


def no_session_hint() -> str:
    """What to do about :func:`no_session_message`."""
    return (
        "Set direct_url (env POOLKIT_DIRECT_URL) to the database's direct address (Supabase: port 5432) and the "
        "sidecar runs such clients there; or keep the state inside a transaction (SET LOCAL, set_config(..., true), "
        "pg_advisory_xact_lock); or set upstream_mode=session if the upstream really keeps sessions."
    )


def pin_limit_hint() -> str:
    """What to do about :func:`pin_limit_message`."""
    return (
        "Raise max_pinned_clients (each pinned client holds one upstream connection until it disconnects "
        "or runs DISCARD ALL), keep the state inside a transaction (SET LOCAL, set_config(..., true), "
        "pg_advisory_xact_lock, CREATE TEMP TABLE ... ON COMMIT DROP), or connect session tools to the direct URL."
    )
