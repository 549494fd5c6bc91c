"""A fault-injecting TCP relay for tests: forwards bytes opaquely (TLS included) and stalls, drops or half-closes links.

The relay runs its own event loop in a daemon thread, so blocking test code (``stack.restart_postgres()``,
a sync driver) never freezes it, and any thread or loop can steer it. Every control returns how many links
it touched and is counted in :attr:`FaultRelay.counters`.

Links are chosen with the same keywords everywhere: ``count`` (that many, picked at random; ``None`` = all),
``idle_for`` (only links that carried no byte for that many seconds) and ``ids`` (these links).

- ``stall(seconds)``: hold every byte of the chosen links for ``seconds`` (``None``: until :meth:`resume`);
  ``new=True`` also stalls links accepted meanwhile (a partition rather than one stuck flow).
- ``drop()``: abort with a TCP RST. ``side="both"`` (default) resets both ends. ``side="server"`` resets
  the upstream end only and leaves the client end open and silent, as after a server host crash or a
  NAT entry expiring: the client learns nothing until its own timeouts. ``side="client"`` is the mirror.
- ``half_close(direction)``: FIN towards one end (``"to_server"`` or ``"to_client"``) and discard what
  would still have gone that way; the other direction keeps flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Self, TypeVar

T = TypeVar("T")
Side = Literal["both", "server", "client"]
Direction = Literal["to_server", "to_client"]
_CHUNK = 65536
_CONTROL_TIMEOUT = 10.0


@dataclass(frozen=True)
class LinkInfo:
    """A snapshot of one relayed connection."""

    ident: int
    age: float
    idle_for: float
    bytes_to_server: int
    bytes_to_client: int
    stalled: bool


async def _read(reader: asyncio.StreamReader) -> bytes | None:
    """The next chunk from ``reader``: ``b""`` at its EOF, None when its end reset the connection."""
    try:
        return await reader.read(_CHUNK)
    except OSError:
        return None


def _pass_eof(writer: asyncio.StreamWriter) -> None:
    """Pass an EOF on: half-close ``writer`` (the other end stopped sending), unless it is closing already."""
    if writer.transport.is_closing():
        return
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST instead of FIN: SO_LINGER with a zero timeout makes close() abort the connection."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection, pumped by two tasks."""

    def __init__(self, ident: int, client: asyncio.StreamWriter) -> None:
        self.ident = ident
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        now = time.monotonic()
        self.opened = now
        self.last_activity = now
        self.bytes = {"to_server": 0, "to_client": 0}
        self.discard: set[str] = set()  # half-closed directions: their bytes are thrown away
        self.dead_end = ""  # "server"/"client" after a one-sided drop: the other end hears nothing at all
        self.stalled_until = 0.0
        self.unstalled = asyncio.Event()
        self.unstalled.set()
        self.closed = False

    def info(self, now: float) -> LinkInfo:
        return LinkInfo(
            self.ident,
            now - self.opened,
            now - self.last_activity,
            self.bytes["to_server"],
            self.bytes["to_client"],
            not self.unstalled.is_set(),
        )

    def stall(self, until: float) -> None:
        self.stalled_until = max(self.stalled_until, until)
        self.unstalled.clear()

    def maybe_resume(self) -> None:
        if time.monotonic() >= self.stalled_until - 0.001:
            self.resume()

    def resume(self) -> None:
        self.stalled_until = 0.0
        self.unstalled.set()

    def abort(self) -> None:
        self.closed = True
        self.unstalled.set()
        _reset(self.client)
        _reset(self.server)


class FaultRelay:
    """A TCP relay from ``listen_host:port`` (a free port) to ``target_host:target_port`` with fault controls.

    Use as a context manager or ``start()``/``stop()``. ``port`` is where clients connect.
    """

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1", seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self.connect_timeout = 5.0
        self._random = random.Random(seed)
        self._links: dict[int, _Link] = {}
        self._next_ident = 0
        self._stall_new_until = 0.0
        self._counters: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Bind a free port and start relaying (in a daemon thread); returns once it listens."""
        ready: threading.Event = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready, failure))
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name=f"fault-relay-{self.target[1]}", daemon=True)
        self._thread.start()
        if not ready.wait(_CONTROL_TIMEOUT):
            raise RuntimeError("the fault relay did not start listening within 10 s")
        if failure:
            raise failure[0]
        return self

    async def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        self._stopped = asyncio.Event()
        try:
            self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        except OSError as exc:
            failure.append(exc)
            ready.set()
            return
        self.port = int(self._server.sockets[0].getsockname()[1])
        ready.set()
        await self._stopped.wait()
        self._server.close()
        for link in list(self._links.values()):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def stop(self) -> None:
        """Reset every link and stop listening; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        stopped = self._stopped
        assert stopped is not None
        loop.call_soon_threadsafe(stopped.set)
        thread.join(_CONTROL_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ relaying

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._next_ident += 1
        link = _Link(self._next_ident, writer)
        self._links[link.ident] = link
        self._counters["accepted"] += 1
        self._counters["peak_links"] = max(self._counters["peak_links"], len(self._links))
        if self._stall_new_until > time.monotonic():
            self._stall(link, self._stall_new_until)
            self._counters["stalls"] += 1
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    server_reader, server_writer = await asyncio.open_connection(*self.target)
            except (OSError, TimeoutError):
                # The upstream refused or did not answer: the client sees its connection reset, as a
                # client of a dead host behind a proxy does.
                self._counters["upstream_refused"] += 1
                _reset(writer)
                return
            link.server = server_writer
            if link.closed:
                _reset(server_writer)
                return
            await asyncio.gather(
                self._pump(link, reader, server_writer, "to_server"),
                self._pump(link, server_reader, writer, "to_client"),
            )
        except asyncio.CancelledError:
            link.abort()  # stop(): asyncio's stream callback would log a cancelled handler as an error
        finally:
            self._links.pop(link.ident, None)
            self._tasks.discard(task)
            for end in (link.client, link.server):
                if end is not None and not end.transport.is_closing():
                    end.close()
            self._counters["closed"] += 1

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        source = "client" if direction == "to_server" else "server"
        while True:
            data = await _read(reader)
            if link.dead_end:
                if not data:
                    if source != link.dead_end:
                        link.abort()  # the live end went away too: now the link is over
                    return
                continue  # a dead end's peer is silent: whatever the live end sends goes nowhere
            if data is None:
                link.abort()  # a reset from one end is passed on to the other, as on a real path
                return
            if not link.unstalled.is_set():
                await link.unstalled.wait()  # a stall holds the EOF too, not only the bytes before it
            if link.closed:
                return
            if link.dead_end:
                continue
            if not data:
                if direction not in link.discard:
                    _pass_eof(writer)
                return
            if direction in link.discard:
                continue
            link.last_activity = time.monotonic()
            link.bytes[direction] += len(data)
            self._counters[f"bytes_{direction}"] += len(data)
            try:
                writer.write(data)
                await writer.drain()
            except (OSError, RuntimeError):
                link.abort()
                return

    # ------------------------------------------------------------------ selection

    def _select(self, count: int | None, idle_for: float | None, ids: Iterable[int] | None) -> list[_Link]:
        now = time.monotonic()
        links = [link for link in self._links.values() if not link.closed and link.server is not None]
        if ids is not None:
            wanted = set(ids)
            links = [link for link in links if link.ident in wanted]
        if idle_for is not None:
            links = [link for link in links if now - link.last_activity >= idle_for]
        if count is not None and count < len(links):
            links = self._random.sample(links, count)
        return links

    # ------------------------------------------------------------------ controls (thread-safe)

    def _call(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("start() the relay first")

        async def run() -> T:
            return fn()

        coro: Coroutine[Any, Any, T] = run()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(_CONTROL_TIMEOUT)

    def _stall(self, link: _Link, until: float) -> None:
        link.stall(until)
        if until != float("inf"):
            assert self._loop is not None
            self._loop.call_at(self._loop.time() + (until - time.monotonic()), link.maybe_resume)

    def stall(
        self,
        seconds: float | None,
        *,
        count: int | None = None,
        idle_for: float | None = None,
        ids: Iterable[int] | None = None,
        new: bool = False,
    ) -> int:
        """Hold every byte of the chosen links for ``seconds`` (``None``: until :meth:`resume`)."""

        def act() -> int:
            until = float("inf") if seconds is None else time.monotonic() + seconds
            if new:
                self._stall_new_until = until
            chosen = self._select(count, idle_for, ids)
            for link in chosen:
                self._stall(link, until)
            self._counters["stalls"] += len(chosen)
            return len(chosen)

        return self._call(act)

    def resume(self) -> int:
        """End every stall now (and stop stalling new links)."""

        def act() -> int:
            self._stall_new_until = 0.0
            stalled = [link for link in self._links.values() if not link.unstalled.is_set()]
            for link in stalled:
                link.resume()
            return len(stalled)

        return self._call(act)

    def drop(
        self,
        *,
        count: int | None = None,
        idle_for: float | None = None,
        ids: Iterable[int] | None = None,
        side: Side = "both",
    ) -> int:
        """Reset the chosen links (TCP RST); ``side`` says which ends hear of it (see the module docstring)."""

        def act() -> int:
            chosen = self._select(count, idle_for, ids)
            for link in chosen:
                if side == "both":
                    link.abort()
                    continue
                link.dead_end = side
                link.resume()
                _reset(link.server if side == "server" else link.client)
            self._counters[f"drops_{side}" if side != "both" else "drops"] += len(chosen)
            return len(chosen)

        return self._call(act)

    def half_close(
        self,
        direction: Direction,
        *,
        count: int | None = None,
        idle_for: float | None = None,
        ids: Iterable[int] | None = None,
    ) -> int:
        """Send FIN towards one end of the chosen links and discard what would still go that way."""
        if direction not in ("to_server", "to_client"):
            raise ValueError(f"direction={direction!r}: use 'to_server' or 'to_client'")

        def act() -> int:
            chosen = self._select(count, idle_for, ids)
            for link in chosen:
                writer = link.server if direction == "to_server" else link.client
                link.discard.add(direction)
                if writer is not None and not writer.transport.is_closing():
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
            self._counters["half_closes"] += len(chosen)
            return len(chosen)

        return self._call(act)

    def links(self) -> list[LinkInfo]:
        """The open links, oldest first."""

        def act() -> list[LinkInfo]:
            now = time.monotonic()
            return [link.info(now) for link in self._links.values() if not link.closed]

        return self._call(act)

    @property
    def counters(self) -> dict[str, int]:
        """What the relay did: accepted, closed, upstream_refused, stalls, drops[_side], half_closes,
        bytes_to_server/bytes_to_client, and peak_links: the most links open at once (a link lives until both
        of its ends closed, so this can briefly exceed what a client itself holds)."""
        return self._call(lambda: dict(self._counters))


__all__ = ["FaultRelay", "LinkInfo"]
