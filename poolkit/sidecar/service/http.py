"""The operations HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on their own port.

Hand-written on asyncio streams rather than prometheus-client's threaded server: scrapes then run on
the event loop that owns the pool state, so the collector reads it without locks or races, and no
web framework joins the dependencies for three GET routes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

_MAX_REQUEST_HEAD = 8192
_READ_TIMEOUT = 10.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class OpsHttpServer:
    """Serves ``registry`` at /metrics; ``readiness()`` -> (ready, reason) decides /readyz."""

    def __init__(self, registry: CollectorRegistry, readiness: Callable[[], tuple[bool, str]]) -> None:
        self.registry = registry
        self.readiness = readiness
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; return the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, host, port, limit=_MAX_REQUEST_HEAD)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """Route one request -> (status, content type, body). Pure, so it is testable without sockets."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            ready, reason = self.readiness()
            return (200 if ready else 503), "text/plain; charset=utf-8", (reason + "\n").encode()
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) < 2:
                return
            status, ctype, body = self.respond(parts[0], parts[1])
            headers = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(headers.encode() + (b"" if parts[0] == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
