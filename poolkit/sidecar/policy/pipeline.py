"""Sans-IO: what a client carries while its request shares a server connection with other clients' (pipelining).

A client queued behind other clients' requests on one server connection (server.py) keeps: the Syncs of
what it sent meanwhile (its bytes wait in the client's buffer, to start a new transaction once its answer
is in), its request as sent (re-sent if a cancel meant for another client hits it), its answer while held
(a cancel may have hit it), the cancels waiting for its request to reach the head (their requesters are
closed once forwarded), and whether it asked for a cancel itself. The connections read and change it;
the one flag read per chunk on the relay's hot path, ``deferring``, stays on the client connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio


class ClientPipeline:
    """One client's state in a pipeline across clients."""

    __slots__ = ("cancel_asked", "cancel_held", "deferred_syncs", "held_answer", "request")

    def __init__(self) -> None:
        self.deferred_syncs = 0
        self.request = b""
        self.held_answer: list[bytes] | None = None
        self.cancel_held: list[asyncio.BaseTransport | None] | None = None
        self.cancel_asked = False

    def take_syncs(self) -> int:
        """The Syncs of the bytes held while deferring (they are sent now)."""
        syncs, self.deferred_syncs = self.deferred_syncs, 0
        return syncs

    def hold_answer(self) -> None:
        """A cancel is on its way to the server: hold this client's answer until it is complete."""
        if self.held_answer is None:
            self.held_answer = []

    def take_answer(self) -> bytes:
        """The held answer, whole; nothing is held any more."""
        answer = b"".join(self.held_answer or ())
        self.held_answer = None
        return answer

    def hold_cancel(self, requester: asyncio.BaseTransport | None) -> None:
        """A cancel for this client's request, which is not at the head of its pipeline yet."""
        self.cancel_held = [*(self.cancel_held or []), requester]

    def take_cancels(self) -> list[asyncio.BaseTransport | None]:
        """The cancels held (their requesters), in order; none are held any more."""
        held, self.cancel_held = self.cancel_held or [], None
        return held
