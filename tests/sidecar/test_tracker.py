"""A client's session tracker (tracker.py) without a socket: pins, the reset guard, the statement tap."""

from __future__ import annotations

import pytest

from poolkit.sidecar.policy.session import NOTHING, Effect, decide
from poolkit.sidecar.policy.tracker import SessionTracker, pins_nothing
from poolkit.sidecar.wire import protocol as p
from poolkit.sidecar.wire.protocol import FrontendScanner


def effects(tracker: SessionTracker, scanner: FrontendScanner, *chunks: bytes) -> list[tuple[Effect, Effect]]:
    out = []
    for chunk in chunks:
        scanner.feed(chunk)
        out.append(tracker.chunk_effect(scanner, chunk))
    return out


def test_a_plain_statement_changes_nothing_and_is_learned_as_a_template() -> None:
    tracker, scanner = SessionTracker(), FrontendScanner(1 << 20)
    [(effect, route)] = effects(tracker, scanner, p.query("SELECT * FROM t WHERE id = 7"))
    assert effect.nothing and route.nothing
    assert tracker.plain_template == b"SELECT * FROM t WHERE id ="
    assert tracker.plain_req  # one autocommit statement: pipelinable
    [(effect, _)] = effects(tracker, scanner, p.query("SELECT * FROM t WHERE id = 12345"))
    assert effect.nothing
    assert tracker.plain_req
    [(effect, _)] = effects(tracker, scanner, p.query("BEGIN"))
    assert effect.nothing
    assert not tracker.plain_req  # transaction control is no autocommit request
    # The same chunk is checked once.
    assert tracker.chunk_effect(scanner, b"") == (NOTHING, NOTHING)


def test_a_statement_split_across_chunks_is_decided_when_whole() -> None:
    tracker, scanner = SessionTracker(), FrontendScanner(1 << 20)
    data = p.query("LISTEN jobs")
    [(first, _), (second, _)] = effects(tracker, scanner, data[:8], data[8:])
    assert first.nothing
    assert tracker.tap is None
    assert second.pins == ("listen",)


def test_a_new_pin_is_proposed_not_made() -> None:
    tracker = SessionTracker()
    assert tracker.apply(decide("SELECT 1"), transaction_pooler=False, server_errors=None) is None
    pin = tracker.apply(decide("LISTEN x"), transaction_pooler=False, server_errors=None)
    assert pin == ("listen", frozenset({"listen"}))
    assert tracker.pin_reason == ""  # the connection may still refuse it (pin limit)
    tracker.pin(*pin, now=100.0)
    assert (tracker.pin_reason, tracker.pinned_since) == ("listen", 100.0)
    # Pinned already: further reasons are added in place.
    assert tracker.apply(decide("CREATE TEMP TABLE t (a int)"), transaction_pooler=False, server_errors=0) is None
    assert tracker.pin_reasons == {"listen", "temp_table"}
    assert tracker.held_reasons() == {"listen", "temp_table"}


def test_a_tracked_setting_pins_only_behind_a_transaction_pooler() -> None:
    effect = decide("SET IntervalStyle = iso_8601")
    assert SessionTracker().apply(effect, transaction_pooler=False, server_errors=None) is None
    assert SessionTracker().apply(effect, transaction_pooler=True, server_errors=None) == (
        "session_set",
        frozenset({"session_set"}),
    )


def pinned(*reasons: str) -> SessionTracker:
    tracker = SessionTracker()
    tracker.pin(reasons[0], frozenset(reasons), now=1.0)
    return tracker


def test_a_reset_frees_the_client_once_the_server_answered_it_without_an_error() -> None:
    tracker = pinned("listen", "temp_table")
    assert tracker.apply(decide("DISCARD ALL"), transaction_pooler=False, server_errors=3) is None
    assert tracker.pin_reasons == frozenset()
    assert tracker.clear_guard == (3, {"listen", "temp_table"})
    # Still held while unconfirmed: a client leaving now leaves the state on its server.
    assert tracker.held_reasons() == {"listen", "temp_table"}
    assert tracker.transaction_over(server_errors=3) is False  # no error since: the connection unpins
    tracker.unpin()
    assert (tracker.pin_reason, tracker.pin_reasons, tracker.clear_guard) == ("", frozenset(), None)
    assert tracker.held_reasons() == frozenset()


def test_a_reset_that_failed_keeps_what_it_was_to_undo() -> None:
    tracker = pinned("listen", "temp_table")
    tracker.apply(decide("DISCARD ALL"), transaction_pooler=False, server_errors=3)
    assert tracker.transaction_over(server_errors=4) is True  # an error since it was sent
    assert tracker.pin_reasons == {"listen", "temp_table"}
    assert tracker.clear_guard is None


def test_a_reset_with_no_server_yet_keeps_the_pin() -> None:
    tracker = pinned("listen")
    assert tracker.apply(decide("DISCARD ALL"), transaction_pooler=False, server_errors=None) is None
    assert tracker.pin_reasons == {"listen"}
    assert tracker.clear_guard is None


def test_a_partial_reset_moves_the_pin_to_a_reason_still_held() -> None:
    tracker = pinned("listen", "temp_table")
    tracker.apply(decide("UNLISTEN *"), transaction_pooler=False, server_errors=0)
    assert tracker.transaction_over(server_errors=0) is True
    assert (tracker.pin_reason, tracker.pin_reasons) == ("temp_table", {"temp_table"})


@pytest.mark.parametrize(
    ("transaction_pooler", "has_direct", "on_pooler", "expected"),
    [
        (False, False, True, False),  # the upstream keeps sessions: a pin holds
        (True, False, False, True),  # a pooler and no direct upstream: nowhere to pin
        (True, True, True, True),  # mid-transaction on the pooler: the state would stay behind there
        (True, True, False, False),  # the pin moves the client to the direct upstream
    ],
)
def test_pins_nothing(transaction_pooler: bool, has_direct: bool, on_pooler: bool, expected: bool) -> None:
    assert pins_nothing(transaction_pooler=transaction_pooler, has_direct=has_direct, on_pooler=on_pooler) is expected
