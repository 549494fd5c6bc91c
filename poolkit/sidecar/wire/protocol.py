"""The PostgreSQL v3 wire codec, sans-IO: bytes in, frames and facts out; no sockets, no asyncio.

The relay never parses a whole message on the hot path. :class:`FrontendScanner` and
:class:`BackendScanner` walk message *headers* (type byte + length) across arbitrary chunk
boundaries and look inside a message only when a pooling decision needs it (ReadyForQuery status,
ParameterStatus, the SQL of a Query/Parse for the slow-query log). Bodies are skipped by count, so a
claimed length is never allocated. :class:`MessageReader` and :class:`StartupReader` buffer whole
messages, but only on the slow paths (login, authentication, the admin console, upstream handshake)
and with a small size limit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from poolkit.errors import ProtocolError

PROTOCOL_V3: Final = 196608  # 3 << 16
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102

# PostgreSQL's own limits: MAX_STARTUP_PACKET_LENGTH and PQ_LARGE_MESSAGE_LIMIT (1 GiB - 1).
MAX_STARTUP_SIZE: Final = 10_000
PG_MAX_MESSAGE_SIZE: Final = 0x3FFFFFFF
# Messages the sidecar buffers to read (login, auth, admin queries, ParameterStatus) stay small.
MAX_INSPECTED_SIZE: Final = 1 << 20

_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")
_I16 = struct.Struct("!h")

# ---------------------------------------------------------------- message kinds (lookup tables)

# Frontend (client -> server) kinds after login.
F_INVALID: Final = 0
F_EXTENDED: Final = 1  # Execute: part of a batch ended by Sync, answered by one completion
F_SYNC: Final = 2  # Sync: the server answers ReadyForQuery
F_QUERY: Final = 3  # simple Query: the server answers ReadyForQuery
F_FUNCTION: Final = 4  # FunctionCall: the server answers ReadyForQuery
F_TERMINATE: Final = 5
F_COPY: Final = 6  # CopyData/CopyDone/CopyFail
F_PARSE: Final = 7  # Parse (extended, carries SQL and maybe a statement name)
F_BIND: Final = 8  # Bind (may name a prepared statement)
F_DESCRIBE: Final = 9  # Describe/Close (of a statement or a portal)
F_FLUSH: Final = 10  # Flush: answered by nothing; after a Sync (psycopg's pipeline exit) it must not hold the server

# Backend (server -> client) kinds.
B_INVALID: Final = 0
B_PLAIN: Final = 1
B_READY: Final = 2  # ReadyForQuery
B_PARAMETER: Final = 3  # ParameterStatus
B_ERROR: Final = 4  # ErrorResponse
# Completions: the one message ending the answer to a Parse/Bind/Close/Describe/Execute (an
# ErrorResponse ends it too). B_ERROR and above count them; see poolkit/sidecar/policy/prepared.py.
B_DONE: Final = 5  # ParseComplete, BindComplete, CloseComplete, EmptyQuery, PortalSuspended, NoData, RowDescription
B_COMMAND: Final = 6  # CommandComplete (its tag can be DISCARD ALL / DEALLOCATE ALL)


def _table(entries: dict[bytes, int]) -> bytes:
    table = bytearray(256)
    for key, kind in entries.items():
        table[key[0]] = kind
    return bytes(table)


FRONTEND_KINDS: Final = _table(
    {
        b"B": F_BIND,
        b"C": F_DESCRIBE,
        b"D": F_DESCRIBE,
        b"E": F_EXTENDED,
        b"H": F_FLUSH,
        b"P": F_PARSE,
        b"S": F_SYNC,
        b"Q": F_QUERY,
        b"F": F_FUNCTION,
        b"X": F_TERMINATE,
        b"d": F_COPY,
        b"c": F_COPY,
        b"f": F_COPY,
    }
)
BACKEND_KINDS: Final = _table(
    {
        **dict.fromkeys((b"R", b"K", b"d", b"c", b"G", b"H", b"W", b"D", b"V"), B_PLAIN),
        **dict.fromkeys((b"N", b"A", b"t", b"v"), B_PLAIN),
        **dict.fromkeys((b"1", b"2", b"3", b"I", b"s", b"n", b"T"), B_DONE),
        b"C": B_COMMAND,
        b"Z": B_READY,
        b"S": B_PARAMETER,
        b"E": B_ERROR,
    }
)

# ReadyForQuery transaction status bytes.
IDLE: Final = ord("I")
IN_TRANSACTION: Final = ord("T")
FAILED_TRANSACTION: Final = ord("E")


def _bad_header(side: str, type_byte: int, length: int, limit: int, *, known: bool = True) -> ProtocolError:
    shown = repr(bytes([type_byte]))
    if not known:
        return ProtocolError(f"{side} sent {shown}, which is not a PostgreSQL protocol v3 message type")
    if length > limit:
        return ProtocolError(
            f"{side} message {shown} claims {length} bytes, over the limit of {limit} "
            "(setting max_message_size); the connection is closed"
        )
    if length < 4:
        return ProtocolError(f"{side} message {shown} has an invalid length {length}")
    return ProtocolError(f"{side} sent {shown}, which is not a PostgreSQL protocol v3 message type")


class _HeaderWalk:
    """Where a header walk stands between chunks: bytes of a body still to skip, or a split header."""

    __slots__ = ("_partial", "_skip", "max_message_size")

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._skip = 0
        self._partial = b""

    @property
    def at_boundary(self) -> bool:
        """True when everything fed so far ends exactly at a message boundary."""
        return self._skip == 0 and not self._partial


class FrontendScanner(_HeaderWalk):
    """Walks client message headers; counts the messages the server will answer with ReadyForQuery.

    After :meth:`feed`: ``unsynced`` is true while an extended-protocol batch has no Sync yet,
    ``terminate_at`` is the offset of a Terminate in the last chunk (``-1`` if none; ``-2`` if it
    started in an earlier chunk), and ``sql_chunk``/``sql_start``/``sql_end`` point at the text of the
    last Query or Parse (a reference into a received chunk, not a copy). ``sql_first`` is where the
    body of the *first* Query/Parse of that chunk starts: equal to ``sql_start`` when the chunk held
    one, so the sidecar's session checks only walk a chunk that held several.

    For named prepared statements: ``batch`` counts the messages sent since the last Sync/Query that
    the server answers with one completion each (Parse, Bind, Describe, Close, Execute).
    ``named_at`` becomes the offset of the first message in a chunk that names a prepared statement
    (a named Parse, Bind or Describe/Close of a statement) or may (its name is not in the chunk yet);
    ``named_syncs``/``named_batch`` are the sync count and ``batch`` just before it. The reader resets
    ``named_at`` to -1; it stays set otherwise, and no later message changes it.
    """

    __slots__ = (
        "batch",
        "named_at",
        "named_batch",
        "named_syncs",
        "sql_chunk",
        "sql_end",
        "sql_first",
        "sql_start",
        "terminate_at",
        "unsynced",
    )

    def __init__(self, max_message_size: int = PG_MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size)
        self.unsynced = False
        self.terminate_at = -1
        self.sql_chunk = b""
        self.sql_start = 0
        self.sql_end = 0
        self.sql_first = 0
        self.batch = 0
        self.named_at = -1
        self.named_syncs = 0
        self.named_batch = 0

    def feed(self, data: bytes) -> int:  # noqa: PLR0912, PLR0915 - the codec's per-message loop: a call per message costs throughput
        """Scan one received chunk; return how many ReadyForQuery answers it will cause."""
        prefix = len(self._partial)
        if prefix:
            data = self._partial + data  # only when a 5-byte header was split across reads
            self._partial = b""
        n = len(data)
        pos = self._skip
        if pos >= n:
            self._skip = pos - n
            return 0
        self._skip = 0
        syncs = 0
        batch = self.batch
        named = self.named_at >= 0
        kinds = FRONTEND_KINDS
        unpack = _U32.unpack_from
        limit = self.max_message_size
        while True:
            if pos + 5 > n:
                self._partial = data[pos:]
                if not named and kinds[data[pos]] in (F_PARSE, F_BIND, F_DESCRIBE):
                    # A header split across reads: the name is unknown yet, so the rewriter must hold it.
                    self._named(pos - prefix, syncs, batch)
                self.batch = batch
                return syncs
            kind = kinds[data[pos]]
            (length,) = unpack(data, pos + 1)
            if kind == F_INVALID or length < 4 or length > limit:
                raise _bad_header("client", data[pos], length, limit, known=kind != F_INVALID)
            end = pos + 1 + length
            if kind == F_EXTENDED:
                self.unsynced = True
                batch += 1
            elif kind == F_BIND:
                self.unsynced = True
                if not named:
                    # Bind: portal name, NUL, statement name, NUL; both empty is the common case to let through.
                    nul = pos + 5 if pos + 5 < n and not data[pos + 5] else data.find(b"\x00", pos + 5, end)
                    if nul < 0 or nul + 1 >= n or data[nul + 1]:
                        named = self._named(pos - prefix, syncs, batch)
                batch += 1
            elif kind == F_SYNC:
                self.unsynced = False
                syncs += 1
                batch = 0
            elif kind == F_QUERY or kind == F_FUNCTION:  # noqa: PLR1714, SIM109 - cheaper than a tuple
                syncs += 1
                batch = 0
                if kind == F_QUERY:
                    if self.sql_chunk is not data:
                        self.sql_first = pos + 5
                    self.sql_chunk = data
                    self.sql_start = pos + 5
                    self.sql_end = min(end, n)
            elif kind == F_PARSE:
                self.unsynced = True
                if self.sql_chunk is not data:
                    self.sql_first = pos + 5
                self.sql_chunk = data
                self.sql_start = pos + 5
                self.sql_end = min(end, n)
                if not named and (pos + 5 >= n or data[pos + 5]):
                    named = self._named(pos - prefix, syncs, batch)
                batch += 1
            elif kind == F_DESCRIBE:
                self.unsynced = True
                # Describe/Close: 'S' (statement) or 'P' (portal), then the name.
                if not named and (pos + 6 >= n or (data[pos + 5] == 83 and data[pos + 6])):
                    named = self._named(pos - prefix, syncs, batch)
                batch += 1
            elif kind == F_TERMINATE and self.terminate_at == -1:
                # Only the first Terminate counts: the bytes before it are all the client may still send.
                self.terminate_at = pos - prefix if pos >= prefix else -2
            if end >= n:
                self._skip = end - n
                self.batch = batch
                return syncs
            pos = end

    def _named(self, at: int, syncs: int, batch: int) -> bool:
        # A message split from an earlier read never lands here unhandled: that read set named_at.
        self.named_at = max(at, 0)
        self.named_syncs = syncs
        self.named_batch = batch
        return True

    def last_sql(self, limit: int = 8192) -> str:
        """The text of the last Query/Parse seen (for logs only), decoded leniently."""
        chunk, start, end = self.sql_chunk, self.sql_start, self.sql_end
        if not chunk:
            return ""
        if chunk[start - 5 : start - 4] == b"P":
            # Parse: statement name, NUL, query, NUL, ...
            nul = chunk.find(b"\x00", start, end)
            if nul < 0:
                return ""
            start = nul + 1
        stop = chunk.find(b"\x00", start, end)
        text = chunk[start : stop if stop >= 0 else end]
        return bytes(text[:limit]).decode("utf-8", "replace")


class BackendScanner(_HeaderWalk):
    """Walks server message headers; counts ReadyForQuery and records what pooling needs.

    After :meth:`feed`: ``status`` is the last ReadyForQuery status byte (``IDLE``, ``IN_TRANSACTION``
    or ``FAILED_TRANSACTION``), ``parameters`` lists ParameterStatus (name, value) pairs seen in the
    chunk (``None`` when there were none, to avoid a list per chunk) and ``errors`` counts
    ErrorResponses.

    For named prepared statements: ``ready_total`` counts every ReadyForQuery, ``terms`` the
    completions (see ``B_DONE``) and ErrorResponses since the last one, ``failed`` says whether one of
    those was an ErrorResponse, and ``discarded`` becomes true on a CommandComplete of ``DISCARD ALL``
    or ``DEALLOCATE ALL`` (the reader resets it).

    For pipelining across clients: ``ends`` lists, for the last chunk, the offset just past each
    ReadyForQuery in that chunk (where one client's answer ends and the next one's begins).
    """

    __slots__ = (
        "discarded",
        "ends",
        "errors",
        "failed",
        "parameters",
        "ready_total",
        "status",
        "terms",
    )

    def __init__(self, max_message_size: int = PG_MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size)
        self.status = IDLE
        self.parameters: list[tuple[str, str]] | None = None
        self.errors = 0
        self.ready_total = 0
        self.terms = 0
        self.failed = False
        self.discarded = False
        self.ends: list[int] = []

    def walk_state(self) -> tuple[int, bytes]:
        """(bytes of the current message still to come, the start of a message not yet counted).

        Both were already passed on; a walker taking over from here must not send them again.
        """
        return self._skip, self._partial

    def feed(self, data: bytes) -> int:  # noqa: PLR0912, PLR0915 - the codec's per-message loop: a call per message costs throughput
        """Scan one received chunk; return how many ReadyForQuery messages it completes."""
        # The same header walk as FrontendScanner.feed, kept inline on purpose: a shared walker would cost
        # a callback per message on the per-chunk hot path, and the per-kind work differs.
        ends = self.ends
        if ends:
            ends.clear()
        base = 0
        if self._partial:
            base = len(self._partial)  # offsets in ``ends`` are into the chunk as received
            data = self._partial + data  # a header (or a small inspected message) was split
            self._partial = b""
        n = len(data)
        pos = self._skip
        if pos >= n:
            self._skip = pos - n
            return 0
        self._skip = 0
        ready = 0
        terms = self.terms
        kinds = BACKEND_KINDS
        unpack = _U32.unpack_from
        limit = self.max_message_size
        while True:
            if pos + 5 > n:
                self._partial = data[pos:]
                self.terms = terms
                return ready
            kind = kinds[data[pos]]
            (length,) = unpack(data, pos + 1)
            if kind == B_INVALID or length < 4 or length > limit:
                raise _bad_header("server", data[pos], length, limit, known=kind != B_INVALID)
            end = pos + 1 + length
            if kind != B_PLAIN:
                if kind == B_DONE:
                    terms += 1
                elif kind == B_COMMAND:
                    if length == 16 or length == 19:  # noqa: PLR1714 - the lengths of the two tags below
                        if end > n:
                            self._partial = data[pos:]
                            self.terms = terms
                            return ready
                        tag = data[pos + 5 : end]
                        if tag == b"DISCARD ALL\x00" or tag == b"DEALLOCATE ALL\x00":  # noqa: PLR1714
                            self.discarded = True
                    terms += 1
                elif kind == B_ERROR:
                    self.errors += 1
                    self.failed = True
                    terms += 1
                else:
                    if kind == B_READY and length != 5:
                        raise ProtocolError(f"server sent a ReadyForQuery of length {length}; it is always 5")
                    if length > MAX_INSPECTED_SIZE:
                        raise _bad_header("server", data[pos], length, MAX_INSPECTED_SIZE)
                    if end > n:
                        self._partial = data[pos:]
                        self.terms = terms
                        return ready
                    if kind == B_READY:
                        self.status = data[pos + 5]
                        ends.append(end - base)
                        ready += 1
                        self.ready_total += 1
                        terms = 0
                        self.failed = False
                    else:
                        if self.parameters is None:
                            self.parameters = []
                        self.parameters.append(parse_parameter_status(data[pos + 5 : end]))
            if end >= n:
                self._skip = end - n
                self.terms = terms
                return ready
            pos = end


# ---------------------------------------------------------------- whole-message readers (slow paths)


class MessageReader:
    """Buffers typed messages and yields them whole; for login, auth, admin and upstream handshakes."""

    __slots__ = ("_buf", "max_message_size", "side")

    def __init__(self, *, side: str = "client", max_message_size: int = MAX_INSPECTED_SIZE) -> None:
        self._buf = bytearray()
        self.side = side
        self.max_message_size = max_message_size

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Append ``data``; return every complete ``(type, body)`` now available."""
        buf = self._buf
        buf += data
        out: list[tuple[bytes, bytes]] = []
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            type_byte, length = _HDR.unpack_from(buf, pos)
            if length < 4 or length > self.max_message_size:
                raise _bad_header(self.side, type_byte[0], length, self.max_message_size)
            end = pos + 1 + length
            if end > n:
                break
            out.append((type_byte, bytes(buf[pos + 5 : end])))
            pos = end
        del buf[:pos]
        return out

    def take_rest(self) -> bytes:
        """Remove and return buffered bytes that did not form a whole message yet."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """A client's StartupMessage: protocol version and parameters (``user``, ``database``, ...)."""

    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks for TLS before its startup message."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption (the sidecar always answers no)."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A cancel request: the (process id, secret key) the sidecar gave the client at login."""

    process_id: int
    secret_key: int


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


class StartupReader:
    """Buffers the untyped packets a client sends before login (startup, SSL/GSS/cancel requests)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> StartupPacket | None:
        """Append ``data``; return the first complete packet (``None`` if incomplete).

        Bytes after the packet stay buffered; read them with :meth:`take_rest`. Bytes after an SSL or
        GSSENC request are refused: the client must wait for the answer (PostgreSQL refuses them too).
        """
        buf = self._buf
        buf += data
        if len(buf) < 4:
            return None
        (length,) = _U32.unpack_from(buf, 0)
        if length < 8 or length > MAX_STARTUP_SIZE:
            raise ProtocolError(
                f"invalid startup packet length {length} (PostgreSQL allows 8 to {MAX_STARTUP_SIZE} bytes)"
            )
        if len(buf) < length:
            return None
        packet = bytes(buf[:length])
        del buf[:length]
        parsed = parse_startup_packet(packet)
        if buf and isinstance(parsed, SSLRequest | GSSENCRequest):
            # Found by fuzzing: one request per read left the rest buffered, so a client pipelining
            # GSSENC requests grew this buffer without limit before logging in.
            name = "SSLRequest" if isinstance(parsed, SSLRequest) else "GSSENCRequest"
            raise ProtocolError(f"received data after {name} before its answer; wait for the server's reply")
        return parsed

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Decode one untyped pre-login packet (length word included)."""
    if len(packet) < 8:
        raise ProtocolError(
            f"invalid startup packet length {len(packet)} (PostgreSQL allows 8 to {MAX_STARTUP_SIZE} bytes)"
        )
    (code,) = _U32.unpack_from(packet, 4)
    if code == SSL_REQUEST_CODE:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(packet) != 16:
            raise ProtocolError("invalid cancel request: expected 16 bytes")
        (pid,) = _I32.unpack_from(packet, 8)
        (key,) = _I32.unpack_from(packet, 12)
        return CancelRequest(pid, key)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolError(f"unsupported frontend protocol {major}.{minor}: the sidecar speaks protocol 3.0")
    parts = packet[8:].split(b"\x00")
    # A well-formed packet ends with an empty name: "k\0v\0...\0" -> trailing ["", ""].
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolError("invalid startup packet layout: parameters must end with a NUL byte")
    items = parts[:-2]
    if len(items) % 2:
        raise ProtocolError("invalid startup packet layout: a parameter has no value")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(items), 2):
            params[items[i].decode()] = items[i + 1].decode()
    except UnicodeDecodeError:
        raise ProtocolError("startup packet parameters are not valid UTF-8") from None
    return StartupMessage(major, minor, params)


# ---------------------------------------------------------------- decoding helpers


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    """``ParameterStatus`` body -> (name, value)."""
    name, _, rest = body.partition(b"\x00")
    value, _, _ = rest.partition(b"\x00")
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body -> {field code: value}, e.g. ``{"S": "ERROR", "C": "42P01"}``."""
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def error_codes(data: bytes) -> list[str]:
    """The SQLSTATE of every ErrorResponse in ``data``, a run of whole backend messages (held answers)."""
    codes: list[str] = []
    pos, n = 0, len(data)
    while pos + 5 <= n:
        (length,) = _U32.unpack_from(data, pos + 1)
        end = pos + 1 + length
        if data[pos] == 0x45:  # E
            codes.append(parse_error_fields(data[pos + 5 : end]).get("C", ""))
        pos = end
    return codes


def parse_auth_request(body: bytes) -> tuple[int, bytes]:
    """Authentication* body -> (code, rest): 0 ok, 3 cleartext, 5 md5 (rest = salt), 10/11/12 SASL."""
    if len(body) < 4:
        raise ProtocolError("server sent a truncated authentication request")
    (code,) = _I32.unpack_from(body, 0)
    return code, body[4:]


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    """The NUL-separated mechanism list of AuthenticationSASL."""
    return [m.decode() for m in data.split(b"\x00") if m]


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse body -> (mechanism, client-first data)."""
    nul = body.find(b"\x00")
    if nul < 0 or len(body) < nul + 5:
        raise ProtocolError("invalid SASLInitialResponse")
    mechanism = body[:nul].decode("ascii", "replace")
    (size,) = _I32.unpack_from(body, nul + 1)
    data = body[nul + 5 :]
    if size != -1 and size != len(data):
        raise ProtocolError("invalid SASLInitialResponse: length does not match")
    return mechanism, data


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    """BackendKeyData body -> (process id, secret key)."""
    if len(body) != 8:
        raise ProtocolError("server sent an invalid BackendKeyData")
    return _I32.unpack_from(body, 0)[0], _I32.unpack_from(body, 4)[0]


def parse_query(body: bytes) -> str:
    """Query body -> SQL text."""
    return body.rstrip(b"\x00").decode("utf-8", "replace")


# ---------------------------------------------------------------- encoding helpers


def message(type_byte: bytes, body: bytes = b"") -> bytes:
    """One typed message: type byte, length (including itself), body."""
    return type_byte + _U32.pack(len(body) + 4) + body


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def startup_message(params: dict[str, str]) -> bytes:
    """A protocol 3.0 StartupMessage."""
    body = _U32.pack(PROTOCOL_V3) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\x00"
    return _U32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _U32.pack(8) + _U32.pack(SSL_REQUEST_CODE)


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return _U32.pack(16) + _U32.pack(CANCEL_REQUEST_CODE) + _I32.pack(process_id) + _I32.pack(secret_key)


def auth_ok() -> bytes:
    return message(b"R", _I32.pack(0))


def auth_sasl(mechanisms: list[str]) -> bytes:
    return message(b"R", _I32.pack(10) + b"".join(_cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(11) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(12) + data)


def password_message(data: bytes) -> bytes:
    """PasswordMessage / SASLResponse (both are type ``p``)."""
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", _cstr(name) + _cstr(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return message(b"K", _I32.pack(process_id) + _I32.pack(secret_key))


def ready_for_query(status: int = IDLE) -> bytes:
    return message(b"Z", bytes([status]))


def query(sql: str) -> bytes:
    return message(b"Q", _cstr(sql))


def terminate() -> bytes:
    return message(b"X")


def negotiate_protocol_version(minor: int, unsupported: list[str]) -> bytes:
    return message(b"v", _I32.pack(minor) + _I32.pack(len(unsupported)) + b"".join(_cstr(o) for o in unsupported))


def error_response(
    code: str,
    text: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """An ErrorResponse (or NoticeResponse with ``notice=True``) with SQLSTATE ``code``."""
    parts = [b"S" + _cstr(severity), b"V" + _cstr(severity), b"C" + _cstr(code), b"M" + _cstr(text)]
    if detail:
        parts.append(b"D" + _cstr(detail))
    if hint:
        parts.append(b"H" + _cstr(hint))
    return message(b"N" if notice else b"E", b"".join(parts) + b"\x00")


def row_description(columns: list[str]) -> bytes:
    """RowDescription of text columns (type oid 25) named ``columns``."""
    body = bytearray(_I16.pack(len(columns)))
    for name in columns:
        body += _cstr(name) + _I32.pack(0) + _I16.pack(0) + _I32.pack(25) + _I16.pack(-1) + _I32.pack(-1)
        body += _I16.pack(0)
    return message(b"T", bytes(body))


def data_row(values: list[str | None]) -> bytes:
    body = bytearray(_I16.pack(len(values)))
    for value in values:
        if value is None:
            body += _I32.pack(-1)
        else:
            raw = value.encode()
            body += _I32.pack(len(raw)) + raw
    return message(b"D", bytes(body))


def command_complete(tag: str) -> bytes:
    return message(b"C", _cstr(tag))


def empty_query_response() -> bytes:
    return message(b"I")
