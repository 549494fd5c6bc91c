"""Pure pooling decisions, without sockets."""

from __future__ import annotations

import pytest

from poolkit.sidecar.policy.pooling import (
    ClientGone,
    connections_to_open,
    forward_cancel,
    login_retry_wait,
    may_pipeline,
    needs_check,
    on_client_gone,
    parameter_changes,
    pool_exhausted_message,
    query_timed_out,
    quote_literal,
    same_setting,
    server_expired,
    should_release,
    take_server_now,
)
from poolkit.sidecar.wire.protocol import FAILED_TRANSACTION, IDLE, IN_TRANSACTION


@pytest.mark.parametrize(
    ("status", "pending", "unsynced", "boundary", "release"),
    [
        (IDLE, 0, False, True, True),
        (IN_TRANSACTION, 0, False, True, False),  # BEGIN ... keeps the server
        (FAILED_TRANSACTION, 0, False, True, False),  # an error inside a transaction keeps it until ROLLBACK
        (IDLE, 1, False, True, False),  # a pipelined query is still owed its answer
        (IDLE, 0, True, True, False),  # Parse/Bind sent without Sync
        (IDLE, 0, False, False, False),  # half a message forwarded
    ],
)
def test_should_release(status: int, pending: int, unsynced: bool, boundary: bool, release: bool) -> None:
    assert should_release(status, pending, unsynced, boundary) is release


@pytest.mark.parametrize(
    ("status", "pending", "unsynced", "client_ok", "server_ok", "action"),
    [
        (IDLE, 0, False, True, True, ClientGone.RELEASE),
        (IN_TRANSACTION, 0, False, True, True, ClientGone.ROLLBACK),
        (FAILED_TRANSACTION, 0, False, True, True, ClientGone.ROLLBACK),
        (IN_TRANSACTION, 1, False, True, True, ClientGone.CLOSE),  # a query still running
        (IDLE, 0, True, True, True, ClientGone.CLOSE),  # a Sync now would commit the implicit transaction
        (IN_TRANSACTION, 0, False, False, True, ClientGone.CLOSE),
        (IN_TRANSACTION, 0, False, True, False, ClientGone.CLOSE),
    ],
)
def test_on_client_gone(  # noqa: PLR0917 - one argument per parametrize column
    status: int, pending: int, unsynced: bool, client_ok: bool, server_ok: bool, action: ClientGone
) -> None:
    got = on_client_gone(
        status=status,
        pending=pending,
        unsynced=unsynced,
        client_at_boundary=client_ok,
        server_at_boundary=server_ok,
    )
    assert got is action


@pytest.mark.parametrize(
    ("waiting", "connecting", "total", "max_size", "expected"),
    [
        (0, 0, 0, 3, 0),
        (1, 0, 0, 3, 1),
        (5, 0, 0, 3, 3),  # capped by max_size
        (5, 1, 2, 3, 1),  # one already on its way
        (2, 2, 2, 3, 0),  # each connecting server will serve one waiter
        (10, 0, 3, 3, 0),
        (3, 0, 5, 3, 0),  # shrunk by a reload: never negative
    ],
)
def test_connections_to_open(waiting: int, connecting: int, total: int, max_size: int, expected: int) -> None:
    assert connections_to_open(waiting=waiting, connecting=connecting, total=total, max_size=max_size) == expected


def test_server_expired() -> None:
    kwargs = {"created_at": 0.0, "idle_since": 90.0, "idle_timeout": 20.0, "lifetime": 3600.0}
    assert server_expired(now=100.0, **kwargs) is None
    assert server_expired(now=111.0, **kwargs) == "idle"
    assert server_expired(now=3600.0, **kwargs) == "lifetime"
    assert server_expired(now=10_000.0, created_at=0, idle_since=0, idle_timeout=0, lifetime=0) is None


def test_pool_exhausted_message_names_pool_size_and_wait() -> None:
    text = pool_exhausted_message(pool="app", max_size=3, waited=2.04, waiting=7)
    assert 'pool "app"' in text
    assert "all 3 server connections" in text
    assert "2.0s" in text
    assert "query_wait_timeout" in text
    assert "7 other clients" in text


def test_same_setting_ignores_spelling() -> None:
    assert same_setting("client_encoding", "utf-8", "UTF8")
    assert same_setting("client_encoding", "unicode", "UTF8")
    assert same_setting("datestyle", "ISO, MDY", "iso,mdy")
    assert not same_setting("timezone", "UTC", "Europe/Paris")
    assert not same_setting("timezone", None, "UTC")


def test_parameter_changes_sets_what_the_client_wants_and_resets_leftovers() -> None:
    defaults = {"timezone": "UTC", "application_name": "poolkit-sidecar", "client_encoding": "UTF8"}
    current = {**defaults, "timezone": "Asia/Tokyo", "extra_float_digits": "3"}
    wanted = {"application_name": "pgbench", "client_encoding": "utf8"}
    changes = parameter_changes(wanted, current, defaults)
    assert ("application_name", "pgbench") in changes
    assert ("timezone", None) in changes  # a previous client's SET TimeZone does not leak
    assert ("extra_float_digits", None) in changes  # RESET also covers settings without a known default
    assert all(name != "client_encoding" for name, _ in changes)  # same encoding, other spelling
    assert parameter_changes(wanted, {**defaults, **wanted}, defaults) == []


def test_quote_literal_quotes_values_and_refuses_nul() -> None:
    # set_statements, which this case also covered, is gone (issue 17: it had no caller).
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal(r"a\b") == "E'a\\\\b'"
    with pytest.raises(ValueError, match="NUL"):
        quote_literal("a\x00b")


def test_needs_check_only_after_server_check_delay() -> None:
    assert not needs_check(now=100.0, idle_since=90.0, check_delay=30.0)  # recently used: handed out as is
    assert needs_check(now=100.0, idle_since=70.0, check_delay=30.0)
    assert needs_check(now=100.0, idle_since=100.0, check_delay=0.0)  # 0: before every hand-out


@pytest.mark.parametrize(
    ("started", "pending", "timeout", "expected"),
    [
        (90.0, 1, 5.0, True),  # 10 s into a query, 5 s allowed
        (98.0, 1, 5.0, False),  # 2 s into it
        (90.0, 0, 5.0, False),  # nothing owed: idle, not a query (idle_transaction_timeout's job)
        (0.0, 1, 0.0, False),  # query_timeout=0: off
    ],
)
def test_query_timed_out(started: float, pending: int, timeout: float, expected: bool) -> None:
    assert query_timed_out(now=100.0, query_started=started, pending=pending, timeout=timeout) is expected


def test_take_server_now_waits_for_a_whole_small_message() -> None:
    assert take_server_now(at_boundary=True, buffered=10, limit=1000)
    assert not take_server_now(at_boundary=False, buffered=9, limit=1000)  # half a message: no server yet
    assert take_server_now(at_boundary=False, buffered=1001, limit=1000)  # a large message streams


def test_forward_cancel_only_to_the_query_of_the_client_that_asked() -> None:
    assert forward_cancel(serving_target=True, pending=1)
    assert not forward_cancel(serving_target=True, pending=0)  # its query finished: nothing to cancel
    assert not forward_cancel(serving_target=False, pending=1)  # the server now serves someone else


def test_login_retry_wait() -> None:
    assert login_retry_wait(now=10.0, retry_at=10.75) == pytest.approx(0.75)
    assert login_retry_wait(now=10.0, retry_at=9.0) == 0.0


def test_may_pipeline_only_a_fresh_request_on_a_usable_connection() -> None:
    ok = {
        "state": "active",
        "being_canceled": False,
        "current_generation": True,
        "writable": True,
        "running_for": 0.0001,
    }
    assert may_pipeline(**ok)  # type: ignore[arg-type]
    for name, bad in [
        ("state", "idle"),
        ("being_canceled", True),
        ("current_generation", False),
        ("writable", False),
        ("running_for", 0.5),  # a query that has run this long may hold the line much longer
    ]:
        assert not may_pipeline(**{**ok, name: bad}), name  # type: ignore[arg-type]


def test_while_a_connection_is_idle_only_a_quick_request_is_pipelined_onto_a_quick_write_in_progress() -> None:
    ok = {"state": "active", "being_canceled": False, "current_generation": True, "writable": True, "running_for": 0.0}
    assert may_pipeline(**ok, idle_elsewhere=False)  # type: ignore[arg-type]
    # Another connection is idle: queueing here must be worth it (quick request, quick line, one write).
    assert not may_pipeline(**ok, idle_elsewhere=True, onto_quick_write=False)  # type: ignore[arg-type]
    assert may_pipeline(**ok, idle_elsewhere=True, onto_quick_write=True)  # type: ignore[arg-type]
    # ... and still only on a usable connection.
    assert not may_pipeline(**{**ok, "writable": False}, idle_elsewhere=True, onto_quick_write=True)  # type: ignore[arg-type]
