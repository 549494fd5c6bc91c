"""Pipelining state (pipeline.py) without a socket: a client's (deferred Syncs, held answer and cancels), a server's."""

from __future__ import annotations

import asyncio

from poolkit.sidecar.policy.pipeline import ClientPipeline, Deliver, ServerPipeline, Turn
from poolkit.sidecar.wire import protocol as p
from poolkit.sidecar.wire.protocol import BackendScanner


class Requester(asyncio.BaseTransport):
    """A cancel requester's connection, as far as the pipeline keeps it (it is only ever closed)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


def test_deferred_syncs_are_taken_once() -> None:
    pipeline = ClientPipeline()
    pipeline.deferred_syncs += 2
    pipeline.deferred_syncs += 1
    assert pipeline.take_syncs() == 3
    assert pipeline.take_syncs() == 0


def test_an_answer_is_held_in_parts_and_taken_whole() -> None:
    pipeline = ClientPipeline()
    assert pipeline.take_answer() == b""  # nothing held: nothing to deliver late
    pipeline.hold_answer()
    assert pipeline.held_answer is not None
    pipeline.held_answer.append(p.command_complete("SELECT 1"))
    pipeline.hold_answer()  # a second cancel on the way keeps what is held
    pipeline.held_answer.append(p.ready_for_query())
    assert pipeline.take_answer() == p.command_complete("SELECT 1") + p.ready_for_query()
    assert pipeline.held_answer is None


def test_cancels_are_held_in_order_and_taken_once() -> None:
    pipeline = ClientPipeline()
    assert pipeline.take_cancels() == []
    first, second = Requester("first"), Requester("second")
    pipeline.hold_cancel(first)
    pipeline.hold_cancel(None)  # a cancel with no requester connection to close
    pipeline.hold_cancel(second)
    assert pipeline.cancel_held == [first, None, second]
    assert pipeline.take_cancels() == [first, None, second]
    assert pipeline.cancel_held is None
    assert pipeline.take_cancels() == []


# ---------------------------------------------------------------- the server side: ServerPipeline


class Client:
    """A client as a server's pipeline sees it: a name and its ClientPipeline."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pipeline = ClientPipeline()

    def __repr__(self) -> str:
        return self.name


def answer(*rows: str, code: str | None = None) -> bytes:
    """One autocommit request's answer: rows and CommandComplete (or an error), then ReadyForQuery(I)."""
    if code is not None:
        return p.error_response(code, "canceling statement due to user request") + p.ready_for_query()
    body = b"".join(p.data_row([row]) for row in rows)
    return p.row_description(["x"]) + body + p.command_complete(f"SELECT {len(rows)}") + p.ready_for_query()


class Relay:
    """What server.py does with a pipeline's actions, recorded: bytes per client, turns, bytes written upstream."""

    def __init__(self, pipeline: ServerPipeline[Client], head: Client | None) -> None:
        self.pipeline = pipeline
        self.head = head
        self.scanner = BackendScanner()
        self.got: dict[str, bytes] = {}
        self.turns: list[Turn[Client]] = []
        self.upstream: list[bytes] = []
        self.released = False

    def write(self, client: Client | None, data: bytes | None) -> None:
        if client is not None and data:
            self.got[client.name] = self.got.get(client.name, b"") + data

    def feed(self, chunk: bytes) -> None:
        self.scanner.feed(chunk)
        for action in self.pipeline.split(chunk, tuple(self.scanner.ends), self.head):
            if isinstance(action, Deliver):
                self.write(action.client, action.data)
                continue
            self.turns.append(action)
            self.write(action.answered, action.data)
            self.write(action.answered, action.late)
            if action.resend is not None:
                self.upstream.append(action.resend)
            if action.broken or action.last:
                self.head = None
                self.released = not action.broken
                break
            self.head = action.next


def pipelined(head: Client, *queued: Client) -> ServerPipeline[Client]:
    pipeline: ServerPipeline[Client] = ServerPipeline()
    for client in queued:
        pipeline.add(client, f"request of {client.name}".encode(), quick=True)
    return pipeline


def test_answers_of_several_clients_are_split_over_any_chunk_boundaries() -> None:
    answers = {"a": answer("1"), "b": answer("2", "22"), "c": answer()}
    stream = answers["a"] + answers["b"] + answers["c"]
    for size in range(1, len(stream) + 1):
        a, b, c = Client("a"), Client("b"), Client("c")
        relay = Relay(pipelined(a, b, c), a)
        for at in range(0, len(stream), size):
            relay.feed(stream[at : at + size])
        assert relay.got == answers, size
        assert [(t.answered, t.done, t.next, t.last) for t in relay.turns] == [
            (a, a, b, False),
            (b, b, c, False),
            (c, c, None, True),
        ]
        assert relay.released and not relay.pipeline.active and len(relay.pipeline) == 0
        assert [cl.pipeline.request for cl in (b, c)] == [b"", b""]  # nothing kept once answered


def test_a_client_that_leaves_mid_pipeline_loses_only_its_answer() -> None:
    a, b, c = Client("a"), Client("b"), Client("c")
    pipeline = pipelined(a, b, c)
    assert pipeline.forget(b)
    assert not pipeline.forget(a)  # the head is the server connection's to forget (server.forget)
    relay = Relay(pipeline, a)
    relay.feed(answer("1") + answer("2"))  # a's and b's: b's bytes go nowhere
    assert relay.got == {"a": answer("1")}
    assert [(t.answered, t.done, t.next) for t in relay.turns] == [(a, a, None), (None, None, c)]
    relay.feed(answer("3"))
    assert relay.got == {"a": answer("1"), "c": answer("3")}
    assert relay.turns[-1].last


def test_requests_pipelined_during_a_turn_are_seen_by_the_next_turn_of_the_same_chunk() -> None:
    a, b, c = Client("a"), Client("b"), Client("c")
    pipeline = pipelined(a, b)
    turns = pipeline.split(answer("1") + answer("2"), [len(answer("1")), 2 * len(answer("2"))], a)
    first = next(turns)
    assert isinstance(first, Turn) and (first.answered, first.data) == (a, answer("1"))
    assert first.next is b and not first.last
    pipeline.add(c, b"request of c", quick=True)  # the pool pipelines a waiter while carrying out that turn
    rest = list(turns)
    assert isinstance(rest[-1], Turn) and rest[-1].next is c and not rest[-1].last


def test_a_cancel_that_hit_a_pipelined_request_has_it_sent_again_once_the_cancel_is_over() -> None:
    a, b = Client("a"), Client("b")
    pipeline = pipelined(a, b)
    a.pipeline.cancel_asked = True  # a asked to cancel its own request (cancel.py)
    pipeline.hold_answers()  # if a's request ends before the cancel lands, b's is canceled instead
    pipeline.cancel_started()
    relay = Relay(pipeline, a)
    relay.feed(answer("1") + answer(code="57014")[:9])
    assert relay.got == {"a": answer("1")}  # b's answer is held until it is complete
    relay.feed(answer(code="57014")[9:])
    assert relay.got == {"a": answer("1")}  # b never sees the cancel meant for a
    turn = relay.turns[-1]
    assert (turn.answered, turn.resent, turn.done, turn.next, turn.resend) == (b, True, None, b, None)
    assert relay.upstream == []  # not while a cancel may still land: it would hit the request again
    assert pipeline.cancel_over() == [b"request of b"]
    assert pipeline.cancel_over() == []
    relay.feed(answer("2"))
    assert relay.got == {"a": answer("1"), "b": answer("2")}
    assert relay.turns[-1].last


def test_a_request_canceled_with_no_cancel_in_flight_is_sent_again_at_once() -> None:
    a, b = Client("a"), Client("b")
    pipeline = pipelined(a, b)
    pipeline.hold_answers()
    relay = Relay(pipeline, a)
    relay.feed(answer("1") + answer(code="57014"))
    assert relay.upstream == [b"request of b"]
    assert relay.turns[-1].resent and relay.turns[-1].next is b


def test_a_cancel_a_client_asked_for_itself_or_that_cannot_run_again_reaches_it() -> None:
    # Its own cancel: the error is its answer.
    a, b = Client("a"), Client("b")
    pipeline = pipelined(a, b)
    pipeline.hold_answers()
    b.pipeline.cancel_asked = True
    relay = Relay(pipeline, a)
    relay.feed(answer("1") + answer(code="57014"))
    assert relay.got["b"] == answer(code="57014")
    assert not relay.turns[-1].resent and relay.turns[-1].last
    # The connection no longer has a statement the request binds: it cannot run again here.
    a, b = Client("a"), Client("b")
    pipeline = ServerPipeline[Client](can_rerun=lambda keys: keys is None)
    pipeline.add(b, b"request of b", quick=True)
    b.pipeline.keys = [b"SELECT $1\x00"]
    pipeline.hold_answers()
    relay = Relay(pipeline, a)
    relay.feed(answer("1") + answer(code="57014"))
    assert relay.got["b"] == answer(code="57014")
    # A held answer that was not canceled is delivered whole.
    a, b = Client("a"), Client("b")
    pipeline = pipelined(a, b)
    pipeline.hold_answers()
    relay = Relay(pipeline, a)
    relay.feed(answer("1") + answer("2"))
    assert relay.got == {"a": answer("1"), "b": answer("2")} and not relay.upstream


def test_a_request_that_leaves_a_transaction_open_breaks_the_pipeline() -> None:
    a, b = Client("a"), Client("b")
    relay = Relay(pipelined(a, b), a)
    relay.feed(p.command_complete("BEGIN") + p.ready_for_query(p.IN_TRANSACTION) + answer("2"))
    assert relay.turns[-1].broken and len(relay.turns) == 1
    assert relay.got == {"a": p.command_complete("BEGIN") + p.ready_for_query(p.IN_TRANSACTION)}


def test_a_held_cancel_is_forwarded_when_its_client_reaches_the_head() -> None:
    a, b = Client("a"), Client("b")
    b.pipeline.hold_cancel(None)
    relay = Relay(pipelined(a, b), a)
    relay.feed(answer("1"))
    assert relay.turns[-1].next is b and relay.turns[-1].cancels


def test_requests_gathered_in_one_turn_go_out_as_one_write_in_order() -> None:
    pipeline: ServerPipeline[Client] = ServerPipeline()
    assert pipeline.take_outbox() == b""
    assert pipeline.gather([b"Q1"])  # the first: the caller flushes at the end of the turn
    assert not pipeline.gather([b"Q2", b"Q3"])
    assert pipeline.outbox == [b"Q1", b"Q2", b"Q3"]  # server.write appends behind them, in order
    assert pipeline.take_outbox() == b"Q1Q2Q3"
    assert pipeline.outbox is None and pipeline.take_outbox() == b""


def test_the_pipeline_starts_with_its_first_request_and_ends_with_its_connection() -> None:
    b, c = Client("b"), Client("c")
    pipeline: ServerPipeline[Client] = ServerPipeline()
    pipeline.quick = True
    assert pipeline.add(b, b"Qb", quick=True)  # this turn's first bytes: the caller flushes at turn's end
    assert pipeline.active  # the head holds what it sends from now on (server.add_to_pipeline)
    assert not pipeline.add(c, b"Qc", quick=False)
    assert not pipeline.quick and len(pipeline) == 2
    assert pipeline.take_outbox() == b"QbQc"  # one write
    pipeline.forget(b)
    pipeline.after_cancel.append(b"Qb")
    assert pipeline.end() == [c]
    assert not pipeline.active and len(pipeline) == 0 and pipeline.after_cancel == []
