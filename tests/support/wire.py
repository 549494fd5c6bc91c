"""A raw PostgreSQL protocol client for tests and benches: a connection (TLS or not) logged in, nothing more.

For measuring and checking what a driver would hide: the backend key, the bytes of a result as they arrive.
"""

from __future__ import annotations

import asyncio
import ssl

from poolkit.sidecar.policy.auth import UpstreamAuth
from poolkit.sidecar.wire import protocol
from poolkit.sidecar.wire.protocol import MessageReader

__all__ = ["open_raw", "raw_login"]

# Large enough that a reader of big results (a COPY read 1 MB at a time) is never held up by the stream's buffer.
_STREAM_LIMIT = 1 << 22


async def open_raw(port: int, ca_file: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:``port``, upgraded to TLS (verified against ``ca_file``) when ``ca_file`` is given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=_STREAM_LIMIT)
    if ca_file is not None:
        writer.write(protocol.ssl_request())
        await writer.drain()
        if await reader.readexactly(1) != b"S":
            writer.close()
            raise RuntimeError(f"the server on port {port} refused TLS")
        await writer.start_tls(ssl.create_default_context(cafile=ca_file), server_hostname="localhost")
    return reader, writer


async def raw_login(
    port: int, *, user: str = "app", password: str | None = None, ca_file: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[int, int]]:
    """Log in as ``user`` to database ``app``: the reader and writer at the first ReadyForQuery, and the backend key.

    Answers any authentication request (``password`` for SCRAM/MD5/cleartext); a refusal raises with its message.
    """
    reader, writer = await open_raw(port, ca_file)
    writer.write(protocol.startup_message({"user": user, "database": "app"}))
    auth, messages = UpstreamAuth(user, password), MessageReader(side="server", max_message_size=1 << 20)
    key: tuple[int, int] | None = None
    while True:
        data = await reader.read(65536)
        if not data:
            writer.close()
            raise RuntimeError(f"the server on port {port} closed the connection during the login")
        for kind, body in messages.feed(data):
            if kind == b"R":
                reply = auth.respond(*protocol.parse_auth_request(body))
                if reply is not None:
                    writer.write(reply)
            elif kind == b"K":
                key = protocol.parse_backend_key_data(body)
            elif kind == b"E":
                writer.close()
                raise RuntimeError(f"login refused: {protocol.parse_error_fields(body).get('M')}")
            elif kind == b"Z":
                if key is None:
                    writer.close()
                    raise RuntimeError("logged in without a BackendKeyData")
                return reader, writer, key
