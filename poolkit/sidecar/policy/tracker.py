"""Sans-IO: one client's session state across transactions (pins and their reasons, the reset guard, the tap).

session.py says what one statement does to a session; a :class:`SessionTracker` keeps what a client's
statements did so far: why it keeps its server connection (``pin_reason``, "" when it does not), every
reason it holds, what a reset statement claimed to undo until the server answered it without an error,
a statement still arriving in pieces, and the last statement found plain (the relay checks the next one
against it by bytes). It decides; the connection (client.py) carries out: it counts pins in its pool,
logs, and answers a client it must refuse.

:meth:`SessionTracker.chunk_effect` runs once per request on the relay's hot path: it is written flat,
one call per request, and is the only call the relay makes here when a request changes no session state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from poolkit.sidecar.policy.session import (
    LITERAL_TAIL,
    NOTHING,
    PIN_REASONS,
    Effect,
    StatementTap,
    autocommit_head,
    chunk_effect,
    decide,
    quick_nothing,
)

if TYPE_CHECKING:
    from poolkit.sidecar.wire.protocol import FrontendScanner


def pins_nothing(*, transaction_pooler: bool, has_direct: bool, on_pooler: bool) -> bool:
    """Would a pin land on a transaction pooler's connection (which keeps no session)?

    ``on_pooler``: the client holds (or is linking, or waits for) a connection of the pooler itself
    rather than of its direct upstream. A pin there pins nothing: the next transaction may run on another
    backend, without the state, and the state stays behind for someone else.
    """
    if not transaction_pooler:
        return False
    if not has_direct:
        return True
    return on_pooler


class SessionTracker:
    """What a client's statements did to its session so far, and whether it keeps its server for it."""

    __slots__ = (
        "_wanted_key",
        "clear_guard",
        "pin_reason",
        "pin_reasons",
        "pinned_since",
        "plain_req",
        "plain_template",
        "sql_seen",
        "tap",
        "template_autocommit",
        "wanted",
    )

    def __init__(self) -> None:
        #: The settings the client wants its server session to have (startup parameters, then what it SET that
        #: PgBouncer restores): a server connection is aligned to them before it runs the client's transaction.
        self.wanted: dict[str, str] = {}
        self._wanted_key: tuple[tuple[str, str], ...] | None = None
        #: Why this client keeps its server connection ("" = it does not), and every reason it holds.
        self.pin_reason = ""
        self.pin_reasons: frozenset[str] = frozenset()
        self.pinned_since = 0.0
        #: The last chunk whose SQL was checked (FrontendScanner.sql_chunk).
        self.sql_seen = b""
        #: The last statement found plain, less its trailing number; and whether it is autocommit too.
        self.plain_template = b""
        self.template_autocommit = False
        #: The last request checked is one plain autocommit statement (pipelinable, shapes.py).
        self.plain_req = False
        #: A statement still arriving in pieces.
        self.tap: StatementTap | None = None
        #: What a reset statement claimed to undo, and the server's error count when it was sent: believed
        #: once the server answered it without an error (:meth:`transaction_over`).
        self.clear_guard: tuple[int, frozenset[str]] | None = None

    def wanted_key(self) -> tuple[tuple[str, str], ...]:
        """A hashable snapshot of ``wanted`` (change settings with :meth:`set_wanted` / :meth:`set_wanted_all`)."""
        if self._wanted_key is None:
            self._wanted_key = tuple(sorted(self.wanted.items()))
        return self._wanted_key

    def set_wanted(self, name: str, value: str) -> None:
        self.wanted[name] = value
        self._wanted_key = None

    def set_wanted_all(self, wanted: dict[str, str]) -> None:
        """All the client's settings at once (its startup parameters, as the upstream canonicalised them)."""
        self.wanted = wanted
        self._wanted_key = None

    def chunk_effect(self, scanner: FrontendScanner, data: bytes) -> tuple[Effect, Effect]:
        """The session effect of the SQL in this chunk, and the route of a statement still arriving."""
        effect = NOTHING
        self.plain_req = False
        tap = self.tap
        if tap is not None:
            done = tap.feed(data)  # its next bytes open this chunk
            if done is not None:
                self.tap = None
                effect = done
        chunk = scanner.sql_chunk
        if chunk is self.sql_seen:
            return effect, NOTHING
        self.sql_seen = chunk
        last, end = scanner.sql_start, scanner.sql_end
        if scanner.sql_first == last:  # one statement in this chunk: the hot path
            start = last
            if chunk[last - 5] == 80:  # Parse: the statement name comes first
                start = chunk.find(b"\x00", last, end) + 1
                stop = chunk.find(b"\x00", start, end) if start else -1
            else:  # Query: the text and a NUL are the whole body
                stop = end - 1 if end > last and chunk[end - 1] == 0 else -1
            if stop >= 0:
                # The same text as the last one found plain but for a trailing number (pgbench -S,
                # a parameterized query): no effect either, and two byte comparisons say so.
                template = self.plain_template
                if (
                    template
                    and chunk.startswith(template, start)
                    and not chunk[start + len(template) : stop].strip(LITERAL_TAIL)
                ):
                    self.plain_req = effect.nothing and self.template_autocommit
                    return effect, NOTHING
                sql = chunk[start:stop]
                text = sql.decode("utf-8", "replace")
                if quick_nothing(text):
                    self.plain_template = sql.rstrip(LITERAL_TAIL)
                    self.template_autocommit = autocommit = autocommit_head(sql)
                    self.plain_req = effect.nothing and autocommit
                    return effect, NOTHING
                return effect.then(decide(text)), NOTHING
        found, route, self.tap = chunk_effect(chunk, scanner.sql_first, last, end)
        return effect.then(found), route

    def apply(
        self, effect: Effect, *, transaction_pooler: bool, server_errors: int | None
    ) -> tuple[str, frozenset[str]] | None:
        """Apply a statement's pins and clears to a client.

        ``server_errors``: the ErrorResponse count of the server connection the client holds or is being
        linked to (``None``: none yet). Returns ``None`` when done (the client was pinned already, or the
        statement pins nothing); else the new pin, ``(reason, reasons)``, which the connection makes with
        :meth:`pin` unless it must refuse it (pin limit, a transaction pooler's connection).
        """
        if effect.sets and transaction_pooler:
            effect = effect.behind_transaction_pooler()
        reasons = effect.apply(self.pin_reasons)
        if self.pin_reason:
            if effect.clears:
                if server_errors is None:
                    # No server yet to confirm the reset ran: keep the pin (it is released with the client).
                    reasons = self.pin_reasons | frozenset(effect.pins)
                elif self.clear_guard is None:
                    # Believe a reset once the server has answered it without an error (transaction_over).
                    self.clear_guard = (server_errors, self.pin_reasons)
            self.pin_reasons = reasons
            return None
        if not reasons:
            return None
        return next(r for r in effect.pins if r in reasons), reasons

    def pin(self, reason: str, reasons: frozenset[str], now: float) -> None:
        """Pin the client for ``reason`` (one of ``reasons``, all it holds); ``now``: wall-clock time."""
        self.pin_reason = reason
        self.pin_reasons = reasons
        self.pinned_since = now

    def unpin(self) -> None:
        self.pin_reason = ""
        self.pin_reasons = frozenset()
        self.clear_guard = None

    def held_reasons(self) -> frozenset[str]:
        """Every session state a pinned client may have left on its server (a reset not yet confirmed too)."""
        if not self.pin_reason:
            return frozenset()
        guard = self.clear_guard
        return self.pin_reasons | (guard[1] if guard else frozenset()) | {self.pin_reason}

    def transaction_over(self, server_errors: int) -> bool:
        """At the end of a pinned client's transaction: does it keep its server (False: a reset freed it,
        the connection unpins it)? ``server_errors``: the server's ErrorResponse count now."""
        guard = self.clear_guard
        if guard is not None:
            self.clear_guard = None
            if server_errors != guard[0]:
                # An error since the reset statement was sent: it may not have run. Keep what it
                # was to undo (PostgreSQL refuses DISCARD ALL inside a transaction block, for one).
                self.pin_reasons |= guard[1]
        reasons = self.pin_reasons
        if not reasons:
            return False
        if self.pin_reason not in reasons:
            self.pin_reason = next(r for r in PIN_REASONS if r in reasons)
        return True
