"""Sans-IO: pipelining across clients, its state and decisions (a server's pipeline, a client's place in one).

One server connection may carry several clients' requests at once: while the request it runs (its
``head``) is one autocommit statement, other clients' such requests are written right behind it, and
PostgreSQL answers them in order. :class:`ServerPipeline` is what the server connection carries for
that: the clients pipelined behind the head (``queued``), whether more may be (``open``, ``quick``), the
bytes gathered for one write per turn of the event loop (``outbox``), requests re-sent once a cancel is
over (``after_cancel``); and it splits the answers between the clients (:meth:`ServerPipeline.split`),
returning what to write to which client and where the connection goes next (:class:`Deliver`,
:class:`Turn`), which server.py carries out. :class:`ClientPipeline` is what one client carries: whether
its request may be pipelined, what it binds and its shape, the Syncs of what it sent meanwhile (its bytes wait in the
client's buffer, to start a new transaction once its answer is in), its request as sent (re-sent if a
cancel meant for another client hits it), its answer while held (a cancel may have hit it), the cancels
waiting for its request to reach the head (their requesters are closed once forwarded), and whether it
asked for a cancel itself. The one flag read per chunk on the relay's hot path, ``deferring``, stays on
the client connection.

Neither needs a socket or an event loop: tests build them with any object that has a ``pipeline``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from poolkit.sidecar.wire.protocol import IDLE, error_codes

if TYPE_CHECKING:
    import asyncio

    from poolkit.sidecar.policy.prepared import Bound

_QUERY_CANCELED = "57014"


class ClientPipeline:
    """One client's state in a pipeline across clients."""

    __slots__ = (
        "binds",
        "cancel_asked",
        "cancel_held",
        "deferred_syncs",
        "held_answer",
        "keys",
        "pipelinable",
        "request",
        "shape",
    )

    def __init__(self) -> None:
        # May its request be pipelined behind another client's (client.py decides, per new transaction).
        self.pipelinable = False
        self.keys: list[bytes] | None = None  # the prepared statement keys its pipelinable request binds
        self.binds: list[Bound] = []
        # Its pipelinable request's shape (shapes.py), kept until its answer times it, only if it was pipelined.
        self.shape: bytes | None = None
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


class Member(Protocol):
    """A client as a server's pipeline sees it: its :class:`ClientPipeline`."""

    @property
    def pipeline(self) -> ClientPipeline: ...


M = TypeVar("M", bound=Member)


class Deliver(Generic[M]):
    """Write ``data``, part of its answer, to ``client``."""

    __slots__ = ("client", "data")

    def __init__(self, client: M, data: bytes) -> None:
        self.client = client
        self.data = data

    def __repr__(self) -> str:
        return f"Deliver({self.client!r}, {self.data!r})"


class Turn(Generic[M]):
    """One ReadyForQuery: the answer of ``answered`` (``None``: its client left) is complete.

    ``data``: the last part of that answer, to write to it first (b"" when nothing is to be written now).
    ``broken``: the request left a transaction open (the connection must go, with everyone on it; nothing
    follows this turn). Otherwise ``done`` is the client whose transaction is over (``None`` when it left,
    or when its request was re-sent: ``resent``, whose bytes are ``resend`` to write now, or ``None`` while a
    cancel is still on its way: :meth:`ServerPipeline.cancel_over` gives them); ``late``: its answer, held
    until complete, to write now. With ``last`` the pipeline is over and the connection goes back to the
    pool; else ``next`` (``None``: a client that left) is the new head, and ``cancels``: it has cancels to
    forward now. ``rest``: bytes after the last turn (only asynchronous messages can come after the last
    answer), for whoever the connection serves next.
    """

    # One per request on the relay's hot path: the usual values are the class's, an instance sets only
    # what differs (cheaper than a slot each to fill).
    broken = False
    resent = False
    resend: bytes | None = None
    late: bytes | None = None
    last = False
    next: M | None = None
    cancels = False
    rest = b""

    def __init__(self, answered: M | None, data: bytes, done: M | None) -> None:
        self.answered = answered
        self.data = data
        self.done = done

    def __repr__(self) -> str:
        names = ("answered", "data", "done", "broken", "resent", "resend", "late", "last", "next", "cancels", "rest")
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"Turn({fields})"


Action = Deliver[M] | Turn[M]


def _all_statements(_keys: list[bytes] | None) -> bool:
    return True


class ServerPipeline(Generic[M]):
    """The pipeline one server connection carries: the clients queued behind its head, and their answers.

    ``active``: answers are split between clients (from the first request pipelined until none is
    left); ``open``: the head's request is pipelinable, so others may go behind it; ``quick``: every
    request on it since its head linked is of a quick shape (shapes.py). ``can_rerun(keys)`` says whether
    the connection still has the prepared statements a request binds (a re-sent request needs them).
    """

    __slots__ = ("active", "after_cancel", "can_rerun", "canceling", "open", "outbox", "queued", "quick")

    def __init__(self, can_rerun: Callable[[list[bytes] | None], bool] = _all_statements) -> None:
        self.can_rerun = can_rerun
        self.active = False
        self.open = False
        self.quick = False
        self.queued: deque[M | None] = deque()  # in order; None for one whose client left
        self.outbox: list[bytes] | None = None  # bytes to write at the end of this turn of the event loop
        self.after_cancel: list[bytes] = []  # re-sent requests, written once the cancels in flight are done
        self.canceling = False  # a cancel is on its way to this connection

    def __len__(self) -> int:
        return len(self.queued)

    # ------------------------------------------------------------- requests in

    def add(self, client: M, request: bytes, *, quick: bool) -> bool:
        """Pipeline ``client``'s ``request`` behind the head, in this turn's write; True as :meth:`gather`.

        The head's client must hold what it sends from now on if the pipeline was not :attr:`active` yet.
        """
        client.pipeline.request = request
        self.queued.append(client)
        self.quick = self.quick and quick
        self.active = True
        outbox = self.outbox  # gather, inline: once per pipelined request
        if outbox is None:
            self.outbox = [request]
            return True
        outbox.append(request)
        return False

    def gather(self, requests: list[bytes]) -> bool:
        """Queue bytes for this turn's one write; True when it is the first (the caller flushes at turn's end).

        Requests for one connection in one turn of the event loop (clients' reads come in batches: the
        request that takes an idle connection and those that are pipelined behind it) go out as one TLS
        record in one system call, which is what pipelining saves most on.
        """
        outbox = self.outbox
        if outbox is None:
            self.outbox = requests
            return True
        outbox.extend(requests)
        return False

    def take_outbox(self) -> bytes:
        """The bytes gathered this turn, as one write (b"" when none); nothing is gathered any more."""
        outbox, self.outbox = self.outbox, None
        if not outbox:
            return b""
        return outbox[0] if len(outbox) == 1 else b"".join(outbox)

    # ------------------------------------------------------------- cancels

    def hold_answers(self) -> None:
        """A cancel goes to the head's request: if it ends first, the next one is hit; hold their answers."""
        for client in self.queued:
            if client is not None:
                client.pipeline.hold_answer()

    def cancel_started(self) -> None:
        self.canceling = True

    def cancel_over(self) -> list[bytes]:
        """No cancel is on its way any more: the re-sent requests that waited for that, to write now."""
        self.canceling = False
        requests, self.after_cancel = self.after_cancel, []
        return requests

    # ------------------------------------------------------------- clients out

    def forget(self, client: M) -> bool:
        """``client`` left while queued: its answer will be dropped. False if it is not queued (the head?)."""
        queued = self.queued
        for i, member in enumerate(queued):
            if member is client:
                queued[i] = None
                return True
        return False

    def end(self) -> list[M]:
        """The connection is gone: the clients still queued (each must be told); the pipeline is empty."""
        clients = [client for client in self.queued if client is not None]
        self.queued.clear()
        self.after_cancel.clear()
        self.active = False
        return clients

    # ------------------------------------------------------------- answers out

    def split(self, data: bytes, ends: Iterable[int], head: M | None) -> Iterator[Action[M]]:
        """Split a chunk of answers at its ReadyForQuery ``ends`` between ``head`` and the clients queued.

        Yields one :class:`Turn` per ReadyForQuery (with the end of its answer), then a :class:`Deliver` for
        the start of the next answer if the chunk ends inside one; bytes of a held answer (a cancel may have
        hit it) are kept here until it is complete. The caller carries out
        each action before taking the next (a turn may pipeline more requests, which the next turn sees);
        splitting stops after a broken or last turn.
        """
        start = 0
        for end in ends:
            if head is None:
                turn: Turn[M] = Turn(None, b"", None)
            else:
                pipeline = head.pipeline
                held = pipeline.held_answer
                if held is None:
                    turn = Turn(head, data[start:end], head)
                    pipeline.request = b""
                else:
                    held.append(data[start:end])  # a cancel meant for another client may have hit it: see _rerun
                    turn = Turn(head, b"", head)
            start = end
            if data[end - 1] != IDLE:
                # Impossible for a pipelinable request; were it to happen, the requests behind it would
                # run inside someone else's transaction.
                turn.broken = True
                turn.done = None
                yield turn
                return
            if head is not None and head.pipeline.held_answer is not None:
                self._finish_held(head, turn)
            if not self.queued:
                self.active = False
                turn.last = True
                turn.rest = data[start:]
                yield turn
                return
            head = turn.next = self.queued.popleft()
            if head is not None and head.pipeline.cancel_held is not None:
                turn.cancels = True
            yield turn
        if start < len(data) and head is not None:
            part = data[start:] if start else data
            held = head.pipeline.held_answer
            if held is not None:
                held.append(part)
            else:
                yield Deliver(head, part)

    def _finish_held(self, client: M, turn: Turn[M]) -> None:
        """``client``'s held answer is complete: deliver it late, or re-send its request (a cancel hit it)."""
        pipeline = client.pipeline
        answer = pipeline.take_answer()
        if not self._rerun(client, answer):
            pipeline.request = b""
            turn.late = answer
            return
        turn.done = None  # it is back in the pipeline
        turn.resent = True
        self.queued.append(client)
        if self.canceling:
            # PostgreSQL signals a canceled backend twice (the process, then its process group); on a busy
            # machine the second signal can land later and cancel the request sent again. Once the cancel
            # connection has closed, both have been sent (cancel_over).
            self.after_cancel.append(pipeline.request)
        else:
            turn.resend = pipeline.request

    def _rerun(self, client: M, answer: bytes) -> bool:
        """Was ``client``'s request canceled by a cancel meant for another one (and can it run again)?"""
        pipeline = client.pipeline
        return (
            not pipeline.cancel_asked
            and _QUERY_CANCELED in error_codes(answer)
            # Behind a transaction pooler its request prepares what it binds itself (reprepare).
            and self.can_rerun(pipeline.keys)
        )
