"""The sidecar's pool, server and client connections and the sidecar show their state in repr, never a password."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import psycopg

from poolkit.sidecar.service.app import Sidecar

if TYPE_CHECKING:
    from .conftest import SidecarThread

T = TypeVar("T")


def _poll(sidecar: SidecarThread, read: Callable[[Sidecar], T], expected: T, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := sidecar.call(read)) != expected:
        assert time.monotonic() < deadline, f"still {got!r}, expected {expected!r}"
        time.sleep(0.02)


def _reprs(app: Sidecar) -> dict[str, str]:
    client = next(iter(app.connections))
    server = client.server or next(iter(app.pool.servers))
    return {"sidecar": repr(app), "pool": repr(app.pool), "client": repr(client), "server": repr(server)}


def test_reprs_show_state_and_no_secret(sidecar: SidecarThread) -> None:
    password = sidecar.call(lambda app: app.pool.dsn.password)
    url = sidecar.call(lambda app: app.pool.dsn.to_url())
    assert password  # the upstream logs in with SCRAM: there is a password to keep out
    port = sidecar.port
    assert sidecar.call(repr) == f"<Sidecar running port={port} pools=app clients=0>"

    with psycopg.connect(sidecar.url()) as conn:
        # Inside a transaction the client holds its server connection.
        backend_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        held = sidecar.call(_reprs)
        ident, process_id = sidecar.call(
            lambda app: (next(iter(app.connections)).server.ident, next(iter(app.connections)).process_id)  # type: ignore[union-attr]
        )
        assert held["sidecar"] == f"<Sidecar running port={port} pools=app clients=1>"
        assert re.fullmatch(
            r"<UpstreamPool app direct max=3 active=1 idle=0 connecting=0 waiting=0 clients=1 pinned=0>", held["pool"]
        ), held["pool"]
        assert re.fullmatch(
            rf"<ClientConnection #{process_id} app@127\.0\.0\.1:\d+ ready server=#{ident} pending=0>", held["client"]
        ), held["client"]
        assert held["server"] == (
            f"<ServerConnection #{ident} app direct active pid={backend_pid} client=#{process_id} pipelined=0>"
        )
        conn.commit()

        # Released: the server is idle in the pool, the client holds none.
        _poll(
            sidecar,
            lambda app: repr(app.pool),
            "<UpstreamPool app direct max=3 active=0 idle=1 connecting=0 waiting=0 clients=1 pinned=0>",
        )
        free = sidecar.call(_reprs)
        assert free["server"] == f"<ServerConnection #{ident} app direct idle pid={backend_pid} client=- pipelined=0>"
        assert re.fullmatch(
            rf"<ClientConnection #{process_id} app@127\.0\.0\.1:\d+ ready server=- pending=0>", free["client"]
        )

        # A session-level SET pins the client to its server connection.
        conn.autocommit = True
        conn.execute("SET search_path = public")
        _poll(sidecar, lambda app: len(app.pool.pinned), 1)
        pinned = sidecar.call(_reprs)
        assert "pinned=1>" in pinned["pool"], pinned["pool"]
        assert re.fullmatch(
            rf"<ClientConnection #{process_id} app@127\.0\.0\.1:\d+ ready server=#\d+ pending=0 pinned=session_set>",
            pinned["client"],
        ), pinned["client"]

    _poll(sidecar, repr, f"<Sidecar running port={port} pools=app clients=0>")
    for text in [*held.values(), *free.values(), *pinned.values()]:
        assert password not in text
        assert url not in text


def test_a_paused_sidecar_says_so(sidecar: SidecarThread) -> None:
    sidecar.call(lambda app: app.pause())
    assert sidecar.call(repr) == f"<Sidecar paused port={sidecar.port} pools=app clients=0>"
    sidecar.call(lambda app: app.resume())
    assert sidecar.call(repr) == f"<Sidecar running port={sidecar.port} pools=app clients=0>"
