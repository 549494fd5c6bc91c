"""Pure pooling decisions: release or keep, reset or close, how many to open, which settings to sync."""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import Enum, IntEnum, StrEnum
from typing import Final

from poolkit.sidecar.wire.protocol import IDLE

# Parameters PostgreSQL reports with ParameterStatus that a client may change and expects to keep
# across transactions (PgBouncer's "varcache" set).
TRACKED_PARAMETERS = frozenset(
    {
        "client_encoding",
        "datestyle",
        "timezone",
        "intervalstyle",
        "standard_conforming_strings",
        "application_name",
    }
)


class ServerState(StrEnum):
    """Where a server connection is in its life; only ``UpstreamPool`` moves it (pool.py).

    A ``StrEnum``: SHOW SERVERS and the metrics print these values, so they are part of the contract.
    """

    CONNECTING = "connecting"  # logging in; counted in the pool's servers already
    IDLE = "idle"  # in the pool's idle list
    ACTIVE = "active"  # serving a client (or being checked, reset, handed over)
    CLOSED = "closed"  # no longer in the pool; its transport is closing or closed


class ClientState(IntEnum):
    """Where a client connection is in its life (client.py moves it)."""

    STARTUP = 0  # before its StartupMessage (or SSLRequest)
    AUTH = 1  # authenticating
    WELCOME = 2  # logged in, being sent its welcome (ParameterStatus, BackendKeyData)
    READY = 3  # relaying
    ADMIN = 4  # on the admin console
    CLOSED = 5


def should_release(status: int, pending: int, unsynced: bool, client_at_boundary: bool) -> bool:
    """After a ReadyForQuery: give the server connection back to the pool?

    As in PgBouncer's transaction mode, ReadyForQuery's status decides: ``I`` releases, ``T``/``E``
    keep the server for the client. A pipelining client may still be owed ReadyForQuery answers
    (``pending``), may have sent part of an extended batch without Sync (``unsynced``) or part of a
    message (not at a boundary): all of those keep the server too, or its answers would go to the
    wrong client.
    """
    return status == IDLE and pending <= 0 and not unsynced and client_at_boundary


# A request is pipelined behind one that has run at most this long: a query that has already run longer
# may well run much longer, and every request pipelined behind it would wait for it while another server
# connection could have served them.
PIPELINE_WINDOW: Final = 0.005


def may_pipeline(
    *,
    state: ServerState,
    being_canceled: bool,
    current_generation: bool,
    writable: bool,
    running_for: float,
    idle_elsewhere: bool = False,
    onto_quick_write: bool = False,
) -> bool:
    """May a client's pipelinable request be pipelined on this busy server connection (pipeline_depth)?

    The caller has checked that the request fits there (``ServerConnection.can_pipeline``: everything on
    it pipelinable, the client's settings, its statements) and that there is room. No cancel may be on
    its way to it, it must not be retiring (reload) or blocked on writes, and what it runs now must
    have started within :data:`PIPELINE_WINDOW`.

    While another server connection is idle (``idle_elsewhere``) a request is pipelined only where that
    costs it next to nothing and saves a system call and a server wake-up each (``onto_quick_write``):
    it is known to be quick (shapes.py), and so is everything on this connection, whose write is still
    being gathered in this turn of the event loop (requests that arrive together go out together).
    """
    if idle_elsewhere and not onto_quick_write:
        return False
    return (
        state == ServerState.ACTIVE
        and not being_canceled
        and current_generation
        and writable
        and running_for < PIPELINE_WINDOW
    )


class ClientGone(Enum):
    """What to do with a server connection whose client disconnected while holding it."""

    RELEASE = "release"  # idle, nothing owed: give it back as is
    ROLLBACK = "rollback"  # in a transaction but quiet: ROLLBACK (+ reset query), then give it back
    CLOSE = "close"  # mid-message or mid-query: its state is unknown, close it


def on_client_gone(
    *, status: int, pending: int, unsynced: bool, client_at_boundary: bool, server_at_boundary: bool
) -> ClientGone:
    """Decide how to clean up after a client that disconnected while holding a server.

    A query still running (``pending``) or a half-forwarded message means the server's state is
    unknown: closing is the only safe answer (PostgreSQL then aborts the transaction itself).
    An extended batch without Sync is closed too: sending the Sync it lacks would *commit* its
    implicit transaction. A quiet transaction is rolled back and the connection kept warm.
    """
    if pending > 0 or unsynced or not client_at_boundary or not server_at_boundary:
        return ClientGone.CLOSE
    if status != IDLE:
        return ClientGone.ROLLBACK
    return ClientGone.RELEASE


def connections_to_open(*, waiting: int, connecting: int, total: int, max_size: int) -> int:
    """How many new server connections to start now.

    ``total`` counts every server connection including those still connecting. Each connection
    being opened will serve one waiting client, so only the shortfall is opened, capped by the room
    left under ``max_size``.
    """
    return max(0, min(waiting - connecting, max_size - total))


def needs_check(*, now: float, idle_since: float, check_delay: float) -> bool:
    """Must an idle server connection pass an empty query before it is handed out (``server_check_delay``)?

    One compare, so a recently used connection (the hot path) costs nothing more. A delay of 0
    checks before every hand-out.
    """
    return now - idle_since >= check_delay


def query_timed_out(*, now: float, query_started: float, pending: int, timeout: float) -> bool:
    """Has the query a client waits for run past ``query_timeout`` (0: never)?

    ``query_started`` is reset at every ReadyForQuery, so each query of a pipeline or transaction
    gets the full time; a client owed nothing (``pending`` 0) is idle, which idle_transaction_timeout covers.
    """
    return timeout > 0 and pending > 0 and now - query_started >= timeout


def take_server_now(*, at_boundary: bool, buffered: int, limit: int) -> bool:
    """A client starting a transaction: take a server connection now, or wait for more bytes?

    Only once its bytes end at a message boundary: a client that sends half a message and stalls
    then holds nothing (PgBouncer, too, waits for a whole packet before it assigns a server). A
    message larger than ``limit`` (the bytes buffered per client) is streamed instead of held.
    """
    return at_boundary or buffered > limit


def forward_cancel(*, serving_target: bool, pending: int) -> bool:
    """Forward a CancelRequest to the server connection found for its client?

    Only while that server still serves the client that asked and a query is under way: a cancel
    for a finished query would otherwise hit whatever runs there next (PgBouncer #717).
    """
    return serving_target and pending > 0


def login_retry_wait(*, now: float, retry_at: float) -> float:
    """Seconds to wait before the next connect attempt after a failed one (``server_login_retry``); 0 = now."""
    return max(0.0, retry_at - now)


def server_expired(
    *, now: float, created_at: float, idle_since: float, idle_timeout: float, lifetime: float
) -> str | None:
    """Why an *idle* server connection should be closed now (``"lifetime"``/``"idle"``), or ``None``.

    A timeout of 0 disables that check.
    """
    if lifetime > 0 and now - created_at >= lifetime:
        return "lifetime"
    if idle_timeout > 0 and now - idle_since >= idle_timeout:
        return "idle"
    return None


def pool_exhausted_message(*, pool: str, max_size: int, waited: float, waiting: int) -> str:
    """The ErrorResponse text a client gets when no server connection freed up in time."""
    return (
        f'pool "{pool}" is exhausted: all {max_size} server connections stayed busy for {waited:.1f}s '
        f"(query_wait_timeout); {waiting} other clients are waiting"
    )


POOL_EXHAUSTED_HINT: Final = (
    "Raise max_size (the upstream must allow it), shorten transactions, or raise query_wait_timeout."
)

# ---------------------------------------------------------------- session parameters

# Startup parameters that are not session settings and are never synced.
NOT_SETTINGS: Final = frozenset({"user", "database", "replication", "options"})
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,62}$")


def valid_setting_name(name: str) -> bool:
    """Is ``name`` usable as a GUC name in a generated ``SET`` (letters, digits, ``_``, ``.``)?"""
    return bool(_SETTING_NAME.match(name))


def _canonical(name: str, value: str) -> str:
    text = value.strip().casefold().replace(" ", "")
    if name == "client_encoding":
        text = text.replace("-", "").replace("_", "")
        return "utf8" if text == "unicode" else text
    return text


def same_setting(name: str, a: str | None, b: str | None) -> bool:
    """Do two spellings of setting ``name`` mean the same (``utf-8`` = ``UTF8``, ``ISO, MDY`` = ``iso,mdy``)?

    Comparing spellings avoids a ``SET`` round trip per transaction for a client that asked for
    ``utf8`` while the server reports ``UTF8``.
    """
    if a is None or b is None:
        return a is b
    return a == b or _canonical(name, a) == _canonical(name, b)


def parameter_changes(
    wanted: Mapping[str, str], current: Mapping[str, str], defaults: Mapping[str, str]
) -> list[tuple[str, str | None]]:
    """What to ``SET`` (value) or ``RESET`` (``None``) so a server session matches what a client expects.

    ``wanted`` is the client's view (its startup parameters, updated by ParameterStatus while it held
    a server), ``current`` what the server session has now, ``defaults`` what it had at login. A
    setting a previous client changed and this one never asked for goes back to its default, so
    one client's ``SET TimeZone`` does not leak into the next client's transactions. Keys are
    lower-case setting names.
    """
    changes: list[tuple[str, str | None]] = []
    for name, value in wanted.items():
        if not same_setting(name, current.get(name), value):
            changes.append((name, value))
    for name, value in current.items():
        if name in wanted:
            continue
        if name not in defaults or not same_setting(name, value, defaults[name]):
            # Not at its login value (or set by us without a known default): RESET is always right.
            changes.append((name, None))
    return changes


def quote_literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings style; NUL is not representable)."""
    if "\x00" in value:
        raise ValueError("a setting value cannot contain a NUL character")
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"
