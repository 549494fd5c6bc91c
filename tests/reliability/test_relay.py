"""The fault relay itself, against a plain echo server: forwarding, stall, drop (RST) and half-close."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from .relay import FaultRelay

WAIT = 10.0  # generous: only a hang can take this long
QUIET = 0.3  # how long "nothing arrives" is watched


@dataclass
class Echo:
    """An echo server that also records what it received and how each connection ended."""

    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    endings: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        except asyncio.CancelledError:
            pass  # the test's loop is closing: asyncio's stream callback would log a cancelled handler
        finally:
            writer.close()


@pytest_asyncio.fixture(loop_scope="function")
async def echo() -> AsyncIterator[Echo]:
    target = Echo()
    server = await asyncio.start_server(target.handle, "127.0.0.1", 0)
    target.port = int(server.sockets[0].getsockname()[1])
    try:
        yield target
    finally:
        server.close()


@pytest.fixture
def relay(echo: Echo) -> Iterator[FaultRelay]:
    with FaultRelay("127.0.0.1", echo.port) as running:
        yield running


async def connect(relay: FaultRelay) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", relay.port)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bytes:
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), WAIT)


async def until(predicate: object, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)
    assert predicate(), what  # type: ignore[operator]


async def test_forwards_both_ways_and_counts(relay: FaultRelay, echo: Echo) -> None:
    reader, writer = await connect(relay)
    payload = bytes(range(256)) * 1000
    assert await roundtrip(reader, writer, payload) == payload
    writer.close()
    await until(lambda: relay.counters.get("closed") == 1, "the link was never closed")
    counters = relay.counters
    assert counters["accepted"] == counters["peak_links"] == 1
    assert counters["bytes_to_server"] == counters["bytes_to_client"] == len(payload)
    assert echo.endings == ["eof"]  # the client's FIN reached the server as a FIN


async def test_stall_holds_bytes_until_resumed(relay: FaultRelay) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"warm") == b"warm"
    assert relay.stall(None) == 1
    writer.write(b"held")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), QUIET)
    assert [link.stalled for link in relay.links()] == [True]
    assert relay.resume() == 1
    assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"held"
    assert relay.counters["stalls"] == 1
    writer.close()


async def test_timed_stall_ends_by_itself_and_stalls_only_the_chosen_link(relay: FaultRelay) -> None:
    first = await connect(relay)
    second = await connect(relay)
    for reader, writer in (first, second):
        assert await roundtrip(reader, writer, b"up") == b"up"
    assert relay.stall(0.5, count=1) == 1
    stalled = [link.ident for link in relay.links() if link.stalled]
    assert len(stalled) == 1
    # Exactly one of the two answers is held back; both arrive once the stall is over.
    results = await asyncio.gather(*(roundtrip(r, w, b"ok") for r, w in (first, second)))
    assert results == [b"ok", b"ok"]
    assert not any(link.stalled for link in relay.links())
    for _, writer in (first, second):
        writer.close()


async def test_new_links_stall_too_when_asked(relay: FaultRelay) -> None:
    relay.stall(None, new=True)
    reader, writer = await connect(relay)
    writer.write(b"x")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(1), QUIET)
    relay.resume()
    assert await asyncio.wait_for(reader.readexactly(1), WAIT) == b"x"
    writer.close()


async def test_drop_resets_both_ends(relay: FaultRelay, echo: Echo) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"hi") == b"hi"
    assert relay.drop() == 1
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), WAIT)
    await until(lambda: echo.endings == ["reset"], f"the server saw {echo.endings}, not a reset")
    assert relay.counters["drops"] == 1


async def test_drop_of_the_server_side_leaves_the_client_open_and_silent(relay: FaultRelay, echo: Echo) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"hi") == b"hi"
    assert relay.drop(side="server") == 1
    await until(lambda: echo.endings == ["reset"], f"the server saw {echo.endings}, not a reset")
    writer.write(b"anyone there?")
    await writer.drain()
    # Neither an answer, nor EOF, nor a reset: the client must find out by its own timeout.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET)
    writer.close()
    await until(lambda: not relay.links(), "the link outlived its client")
    assert relay.counters["drops_server"] == 1


async def test_half_close_to_the_client_keeps_the_other_direction(relay: FaultRelay, echo: Echo) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"hi") == b"hi"
    assert relay.half_close("to_client") == 1
    assert await asyncio.wait_for(reader.read(1), WAIT) == b""  # EOF for the client...
    writer.write(b"still flowing")
    await writer.drain()
    await until(lambda: bytes(echo.received) == b"histill flowing", "client bytes stopped after the half-close")
    writer.close()  # ...and when the client closes, the server gets its FIN
    await until(lambda: echo.endings == ["eof"], f"the server saw {echo.endings}")
    assert relay.counters["half_closes"] == 1


async def test_half_close_to_the_server_delivers_a_fin(relay: FaultRelay, echo: Echo) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"hi") == b"hi"
    assert relay.half_close("to_server") == 1
    await until(lambda: echo.endings == ["eof"], f"the server saw {echo.endings}, not a FIN")
    # The echo server closes in turn, and its FIN reaches the client.
    assert await asyncio.wait_for(reader.read(1), WAIT) == b""
    writer.close()


async def test_an_unreachable_upstream_resets_the_client() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])  # bound, never listening: connections are refused
        with FaultRelay("127.0.0.1", port) as relay:
            with pytest.raises(ConnectionResetError):  # at connect or at the first read: the RST races us
                await connect_and_read(relay)
            assert relay.counters["upstream_refused"] == 1


async def connect_and_read(relay: FaultRelay) -> bytes:
    reader, writer = await connect(relay)
    try:
        return await asyncio.wait_for(reader.read(1), WAIT)
    finally:
        writer.close()
