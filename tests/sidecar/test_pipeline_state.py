"""A client's pipeline state (pipeline.py) without a socket: deferred Syncs, the held answer, held cancels."""

from __future__ import annotations

import asyncio

from poolkit.sidecar.policy.pipeline import ClientPipeline
from poolkit.sidecar.wire import protocol as p


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
