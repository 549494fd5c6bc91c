"""Named prepared statements in transaction mode, sans-IO: rename, prepare on demand, answer in order.

A client's named statement lives on whichever server connection it gets next, so the sidecar keeps
the statements per client (name -> the Parse body after the name: query text and parameter types,
which is also the statement's key) and per server (an LRU of key -> server-side name ``poolkit_<digest>``,
a digest of the key, so a name left upstream by anyone always stands for the same SQL).
Client messages are rewritten on their way out (:meth:`ClientStatements.rewrite`):

* Parse(name): Close(server name) + Parse(server name), even where the server has the key (a
  client prepares again when PostgreSQL said the statement's result type changed, and must get a new
  one). A second Parse of a live name fails like PostgreSQL's (42P05).
* Bind / Describe(S) with a known name: renamed; a server lacking it first gets a Parse whose
  ParseComplete the client never sees.
* Close(S): answered here (CloseComplete); server statements stay cached for every client.
* Evicting from a full server cache sends Close(server name); its CloseComplete is swallowed.

Responses must then be dropped, replaced or synthesised at exact places in the server's stream
(:meth:`ServerStatements.responses`). Each request the server answers is located by a position:
``z`` = how many ReadyForQuery the server sent before its batch, ``t`` = how many completion
messages (ParseComplete, BindComplete, CloseComplete, RowDescription/NoData, CommandComplete,
EmptyQuery, PortalSuspended or ErrorResponse) precede it in that batch. The header scanners count
both on the relay's zero-copy path, so the response side only walks messages while a rewritten
request is outstanding, and traffic without named statements never enters this module. After an
ErrorResponse PostgreSQL skips to Sync: requests positioned there never run, so their bookkeeping is
undone (a skipped Parse is not cached, a skipped Close leaves its statement to close later) and no
response is synthesised for them.

Hand-written because no library rewrites a live protocol stream; PgBouncer 1.21+ does the same job
(``max_prepared_statements``) by tracking every request of a server. Known limit: what a client
pipelines *behind* a batch that fails (or runs DISCARD ALL) is rewritten before that outcome is known,
so a statement whose Parse failed there is still renamed (its error then names ``poolkit_<digest>``).

Behind a transaction pooler (``ServerStatements.transaction``) each batch may run on another backend, so
the server cache holds for one batch: a statement is prepared again in every batch that uses it. Every
Parse the sidecar sends is preceded by a Close of its name (not an error when it does not exist), so it
succeeds on whichever backend it lands, whatever an earlier batch or another sidecar left there.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Final

from poolkit.errors import ProtocolError
from poolkit.sidecar.wire.protocol import B_DONE, B_ERROR, B_READY, BACKEND_KINDS, BackendScanner, error_response

if TYPE_CHECKING:
    from poolkit.sidecar.wire.protocol import FrontendScanner

EVENTS: Final = ("hit", "miss", "eviction")
SERVER_NAME_PREFIX: Final = b"poolkit_"
# Described to make the server fail where a client's request must (a second Parse of a live name).
_MISSING_NAME: Final = b"poolkit_missing"

_U32 = struct.Struct("!I")
_DESCRIBE_UNNAMED: Final = b"D\x00\x00\x00\x06S\x00"
B_READY_BYTE: Final = b"Z"[0]
# What PostgreSQL answers when a prepared statement's result types changed under it, with the fields
# drivers recognise it by (asyncpg: the routine, RevalidateCachedQuery in plancache.c, since the text
# is translated).
_PLAN_CHANGED_FIELDS: Final = (
    b"SERROR\x00VERROR\x00C0A000\x00Mcached plan must not change result type\x00"
    b"Fplancache.c\x00RRevalidateCachedQuery\x00\x00"
)
_PLAN_CHANGED: Final = b"E" + _U32.pack(4 + len(_PLAN_CHANGED_FIELDS)) + _PLAN_CHANGED_FIELDS
_CLOSE_COMPLETE: Final = b"3\x00\x00\x00\x04"

# Client message type bytes.
_P, _B, _D, _C, _E = b"P"[0], b"B"[0], b"D"[0], b"C"[0], b"E"[0]
_S, _Q, _F = b"S"[0], b"Q"[0], b"F"[0]
_STATEMENT, _PORTAL = b"S"[0], b"P"[0]
_PARSE_DONE, _CLOSE_DONE, _ERROR = b"1"[0], b"3"[0], b"E"[0]

# What an outstanding entry stands for. Synthesised answers come first: they wait for a position
# instead of a server message.
_SYNTH_CLOSE = 2  # a client's Close(S), answered here
_PARSE = 3  # the client's Parse, sent under the server name: undo the caches if it fails
_INJECTED = 4  # a Parse the sidecar added: swallow its ParseComplete
_CLOSE = 5  # a Close the sidecar added (eviction): swallow its CloseComplete
_FAIL = 6  # a Describe of a missing statement: replace its error with the client's error
_DROP = 7  # a Close the sidecar sends before each Parse it sends: swallow its CloseComplete
_CAPTURE = 8  # a client's Describe of its statement: remember the description it gets (Statement.described)
_PARAMETERS_BYTE: Final = b"t"[0]


class Statement:
    """A client's named statement: its key (the Parse body after the name), and whether that Parse failed.

    ``described`` is how the server described it (ParameterDescription, then RowDescription or NoData)
    the first time the sidecar prepared it again on its own (see :class:`AnswerHead`); ``pinned`` is the
    key with the parameter types of that description, so that a Parse sent again keeps the types the
    client encodes its parameters for, as a prepared statement's types are kept in PostgreSQL.
    """

    __slots__ = ("autocommit", "described", "failed", "key", "pinned")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.failed = False
        self.autocommit: bool | None = None  # may it be pipelined across clients (client.py decides)
        self.described: bytes | None = None
        self.pinned = key

    def describe(self, description: bytes) -> None:
        """Remember the server's description of this statement, and pin its parameter types."""
        self.described = description
        (length,) = _U32.unpack_from(description, 1)
        types = description[5 : 1 + length]  # int16 count, then the type OIDs
        text_end = self.key.index(0) + 1
        self.pinned = self.key[:text_end] + types


class AnswerHead:
    """The head of the answer to a request :meth:`ClientStatements.reprepare` wrote, which its client must not see.

    The request starts with the sidecar's Parse and Describe of the statement, so the answer starts with
    ParseComplete, ParameterDescription and RowDescription (or NoData). :meth:`feed` removes them and
    compares the description with the one the statement had before: if a schema change gave it other
    result or parameter types, the client (whose driver decodes by the old ones) gets what PostgreSQL
    says of a prepared statement in that case, ``0A000 cached plan must not change result type``, and
    none of the answer (PostgreSQL refuses before running it; here the statement has run: a read-only
    one is unaffected, and a write's parameters kept their types, see :attr:`Statement.pinned`). An
    error from the server (the Parse failed) is passed on from where it starts.
    """

    __slots__ = ("_buf", "_failing", "_partial", "_skip", "done", "statement")

    def __init__(self, statement: Statement) -> None:
        self.statement = statement
        self.done = False
        self._buf = b""
        self._failing = False
        self._skip = 0
        self._partial = b""

    def feed(self, part: bytes) -> bytes:
        """The client's share of ``part``, the next bytes of this request's answer."""
        if self._failing:
            return self._drop(part)
        buf = self._buf + part if self._buf else part
        n = len(buf)
        ends = []
        pos = 0
        for expected in (b"1", b"t", b"Tn"):
            if n - pos < 5:
                break
            (length,) = _U32.unpack_from(buf, pos + 1)
            if buf[pos] not in expected:
                self.done = True  # the server's own answer (an error) starts here
                return buf[pos:]
            pos += 1 + length
            if pos > n:
                break
            ends.append(pos)
        if len(ends) < 3:
            self._buf = buf
            return b""
        self._buf = b""
        description = buf[ends[0] : ends[2]]
        statement = self.statement
        if statement.described is None or statement.described == description:
            if statement.described is None:
                statement.describe(description)
            self.done = True
            return buf[ends[2] :]
        if _result_types(description) == _result_types(statement.described):
            statement.described = description  # the same types (a table made again): not a change
            self.done = True
            return buf[ends[2] :]
        self._failing = True
        return self._drop(buf[ends[2] :])

    def _drop(self, data: bytes) -> bytes:
        """Drop the rest of the answer; at its ReadyForQuery, answer with the error instead."""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        pos = self._skip
        n = len(data)
        while pos < n:
            if n - pos < 5:
                self._partial = data[pos:]
                self._skip = 0
                return b""
            (length,) = _U32.unpack_from(data, pos + 1)
            if data[pos] == B_READY_BYTE and pos + 1 + length <= n:
                self.done = True
                return _PLAN_CHANGED + data[pos : pos + 1 + length]
            pos += 1 + length
        self._skip = pos - n
        return b""


def _result_types(description: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Parameter types, and each result column's name and type (OID, size, modifier), of a description."""
    (length,) = _U32.unpack_from(description, 1)
    params = description[5 : 1 + length]
    rows = description[1 + length :]
    columns: list[tuple[bytes, bytes]] = []
    if rows[:1] == b"T":
        pos = 7
        for _ in range(int.from_bytes(rows[5:7], "big")):
            name_end = rows.index(0, pos)
            # name, then table OID (4) and column number (2), which a table made again changes, then
            # type OID (4), size (2), modifier (4) and format (2)
            columns.append((rows[pos:name_end], rows[name_end + 7 : name_end + 17]))
            pos = name_end + 19
    return params, columns


class _Expect:
    """One rewritten request whose answer must be dropped, replaced or synthesised (or undone)."""

    __slots__ = (
        "action",
        "cached",
        "client",
        "collected",
        "error",
        "generation",
        "key",
        "name",
        "server_name",
        "statement",
        "t",
        "z",
    )

    def __init__(self, action: int, z: int, t: int) -> None:
        self.action = action
        self.z = z
        self.t = t
        self.key = b""
        self.name = b""
        self.server_name = b""
        self.client: ClientStatements | None = None
        self.statement: Statement | None = None
        self.generation = 0
        self.error = b""
        # A Parse of a statement the server had: if the batch is skipped, the Close before it did not
        # run either, and the server still has it.
        self.cached = False
        # _CAPTURE: the description collected so far (None: a message was split across reads).
        self.collected: bytes | None = b""


class ServerStatements:
    """One server connection's statement cache (LRU) and the answers owed for rewritten requests.

    ``responses`` rewrites the server's bytes while ``active``; otherwise they go to the client
    untouched and ``scanner`` (the connection's :class:`BackendScanner`) keeps the position.
    """

    __slots__ = (
        "active",
        "cache",
        "cache_z",
        "drop",
        "failed",
        "fwd",
        "held",
        "limit",
        "orphans",
        "queue",
        "rt",
        "rz",
        "scanner",
        "skip",
        "stats",
        "transaction",
    )

    def __init__(
        self, scanner: BackendScanner, limit: int, stats: dict[str, int], *, transaction: bool = False
    ) -> None:
        self.scanner = scanner
        self.limit = max(1, limit)
        self.stats = stats
        self.cache: OrderedDict[bytes, bytes] = OrderedDict()  # key -> server-side name, oldest first
        # Behind a transaction pooler each batch (up to a Sync) may run on another backend, so what
        # the cache says holds for one batch only: ``cache_z``, the batch it was filled in.
        self.transaction = transaction
        self.cache_z = -1
        self.orphans: list[bytes] = []  # server names that may exist there and are to be closed
        self.queue: deque[_Expect] = deque()
        self.active = False
        # Response-walk state, valid while active.
        self.rz = 0
        self.rt = 0
        self.failed = False
        self.skip = 0  # bytes of the current message still to come
        self.drop = False  # ... and whether they are dropped
        self.held = b""  # an incomplete header, not yet forwarded
        self.fwd = b""  # the start of a message the zero-copy path already forwarded

    def __len__(self) -> int:
        return len(self.cache)

    def renames_only(self, keys: list[bytes]) -> bool:
        """Would a request binding ``keys`` only be renamed here (nothing prepared, closed or owed)?"""
        if self.active or self.orphans or self.transaction:
            return False
        cache = self.cache
        return all(key in cache for key in keys)

    def reprepares(self, binds: list[Bound]) -> bool:
        """Would :meth:`ClientStatements.reprepare` serve a request with these Binds here?

        Behind a transaction pooler, a request that binds one statement, first in it: its statement is
        prepared again in front of it, and the only answer to remove is the first.
        """
        return self.transaction and not self.active and not self.orphans and len(binds) == 1 and binds[0][1] == 0

    def discard_all(self) -> None:
        """The session ran DISCARD ALL / DEALLOCATE ALL: nothing is prepared there any more."""
        self.cache.clear()
        self.orphans.clear()

    def reset(self) -> None:
        """The sidecar talks to the server itself (at ReadyForQuery): no client answer is owed any more."""
        while self.queue:
            self._undo(self.queue.pop())
        self.active = False
        self.skip = 0
        self.drop = False
        self.held = self.fwd = b""

    # ------------------------------------------------------------- used by ClientStatements

    def _cache_for(self, z: int) -> OrderedDict[bytes, bytes]:
        """The cache for a message of batch ``z`` (emptied first where batches may change backend)."""
        if self.transaction and self.cache_z != z:
            self.cache.clear()
            self.cache_z = z
        return self.cache

    def _add(self, entry: _Expect) -> None:
        if self._failed_batch(entry.z):
            self._undo(entry)  # sent all the same, but PostgreSQL skips it: nothing will answer
            return
        if not self.active:
            scanner = self.scanner
            self.rz = scanner.ready_total
            self.rt = scanner.terms
            self.failed = scanner.failed
            self.skip, self.fwd = scanner.walk_state()
            self.drop = False
            self.held = b""
            self.active = True
        self.queue.append(entry)

    def _failed_batch(self, z: int) -> bool:
        """Has batch ``z`` already failed (an ErrorResponse came, its ReadyForQuery not yet)?"""
        if self.active:
            return self.failed and self.rz == z
        scanner = self.scanner
        return scanner.failed and scanner.ready_total == z

    def _due(self, z: int, t: int) -> int:
        """For an answer synthesised at (z, t): 1 send it now, -1 it is skipped (error), 0 queue it."""
        if self.queue:
            return 0
        if self.active:
            boundary = not (self.skip or self.held or self.fwd)
            rz, rt, failed = self.rz, self.rt, self.failed
        else:
            scanner = self.scanner
            boundary = scanner.at_boundary
            rz, rt, failed = scanner.ready_total, scanner.terms, scanner.failed
        if rz != z or not boundary:
            return 0
        if failed:
            return -1
        return 1 if rt == t else 0

    def _uncache(self, key: bytes, server_name: bytes) -> None:
        if self.cache.get(key) == server_name:
            del self.cache[key]

    # ------------------------------------------------------------- response side

    def responses(self, data: bytes) -> bytes:  # noqa: PLR0912, PLR0915 - per-message loop on the hot path: a call per message costs throughput
        """Rewrite one chunk from the server: drop, replace and insert answers as the queue says."""
        out: list[bytes] = []
        pre = len(self.fwd)
        if pre:
            data = self.fwd + data
            self.fwd = b""
        elif self.held:
            data = self.held + data
            self.held = b""
        n = len(data)
        run = pre  # forward data[run:pos] unchanged; bytes before `pre` already went out
        pos = 0
        skip = self.skip
        if skip:
            if skip > n:
                self.skip = skip - n
                return b"" if self.drop else data
            self.skip = 0
            if self.drop:
                self.drop = False
                run = skip
            pos = skip
        if not pre:
            run = self._settle(data, run, pos, out)
        kinds = BACKEND_KINDS
        queue = self.queue
        while pos < n:
            if n - pos < 5:
                if pos == 0 and pre:
                    self.fwd = data  # still incomplete, and already partly forwarded: keep forwarding
                else:
                    self.held = data[pos:]
                    n = pos
                break
            kind = kinds[data[pos]]
            (length,) = _U32.unpack_from(data, pos + 1)
            end = pos + 1 + length
            replaced: bytes | None = None
            if queue and queue[0].action == _CAPTURE:
                self._capture(queue[0], data, pos, end, kind)
            if kind == B_READY:
                self.rz += 1
                self.rt = 0
                self.failed = False
                if queue and queue[0].z < self.rz:
                    self._skipped(self.rz)  # only after an error (undone there); kept as a safety net
            elif kind >= B_ERROR:  # ErrorResponse or a completion: one request answered
                if queue and not (pos == 0 and pre):
                    head = queue[0]
                    if head.action >= _PARSE and head.z == self.rz and head.t == self.rt:
                        queue.popleft()
                        replaced = self._answer(head, data[pos])
                self.rt += 1
                if kind == B_ERROR:
                    self.failed = True
                    # PostgreSQL skips the rest of this batch: undo it now, before the client (which
                    # has seen the error) sends more that depends on it.
                    if queue and queue[0].z == self.rz:
                        self._skipped(self.rz + 1)
            if replaced is not None:
                if pos > run:
                    out.append(data[run:pos])
                if replaced:
                    out.append(replaced)
                if end > n:
                    self.skip = end - n
                    self.drop = True
                    run = pos = n
                    break
                run = end
            elif end > n:
                self.skip = end - n
                self.drop = False
                pos = n
                break
            pos = end
            run = self._settle(data, run, pos, out)
        if run < n:
            out.append(data[run:n] if run or n < len(data) else data)
        if not queue and not self.skip and not self.held and not self.fwd:
            self.active = False
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def _capture(self, entry: _Expect, data: bytes, pos: int, end: int, kind: int) -> None:
        """Collect the ParameterDescription and RowDescription/NoData answering a client's Describe."""
        if entry.z != self.rz or entry.t != self.rt:
            return
        if entry.collected is not None and (data[pos] == _PARAMETERS_BYTE or kind == B_DONE):
            # A message split across reads is not collected: the statement then stays undescribed, and
            # the first Parse the sidecar sends again for it describes it (AnswerHead).
            entry.collected = entry.collected + data[pos:end] if end <= len(data) else None

    def _skipped(self, below: int) -> None:
        # Undo the entries of batches before ``below``, last first: a Close then a Parse of one name
        # must leave the name as it was before both.
        queue = self.queue
        skipped = []
        while queue and queue[0].z < below:
            skipped.append(queue.popleft())
        for entry in reversed(skipped):
            self._undo(entry)

    def _settle(self, data: bytes, run: int, pos: int, out: list[bytes]) -> int:
        """At a message boundary: send the synthesised answers due here (after an error, none is)."""
        queue = self.queue
        if not queue:
            return run
        head = queue[0]
        if head.action >= _PARSE or head.z != self.rz or head.t != self.rt or self.failed:
            return run  # the usual case; a failed batch's entries are undone at its ReadyForQuery
        if pos > run:
            out.append(data[run:pos])
        while queue:
            head = queue[0]
            if head.action >= _PARSE or head.z != self.rz or head.t != self.rt:
                break
            queue.popleft()
            out.append(_CLOSE_COMPLETE)
        return pos

    def _answer(self, entry: _Expect, type_byte: int) -> bytes | None:
        """The server answered ``entry``: ``None`` forwards that message, bytes replace it (b"" drops it)."""
        action = entry.action
        if action == _INJECTED:
            if type_byte == _PARSE_DONE:
                return b""
            self._uncache(entry.key, entry.server_name)  # the client sees why its statement failed
        elif action == _CLOSE:
            if type_byte == _CLOSE_DONE:
                return b""
            self.orphans.append(entry.server_name)
        elif action == _PARSE:
            if type_byte == _ERROR:
                entry.cached = False  # the Close before it ran: the server has it no more
                self._undo(entry)
        elif action == _FAIL and type_byte == _ERROR:
            return entry.error
        elif action == _DROP and type_byte == _CLOSE_DONE:
            return b""
        elif action == _CAPTURE and type_byte != _ERROR and entry.statement is not None:
            collected = entry.collected
            if collected is not None and collected[:1] == b"t":
                entry.statement.describe(collected)
        return None

    def _undo(self, entry: _Expect) -> None:
        """``entry``'s request never ran (or failed): make the caches say so again."""
        action = entry.action
        if entry.cached:
            self.cache.setdefault(entry.key, entry.server_name)
        elif action in (_PARSE, _INJECTED):
            self._uncache(entry.key, entry.server_name)
        elif action == _CLOSE:
            self.orphans.append(entry.server_name)  # it may still exist: close it later
        client, statement = entry.client, entry.statement
        if client is None or statement is None or client.generation != entry.generation:
            return
        if action == _PARSE:
            statement.failed = True  # a skipped Close of it must not bring it back
            if client.names.get(entry.name) is statement:
                del client.names[entry.name]
        elif action == _SYNTH_CLOSE and not statement.failed and entry.name not in client.names:
            client.names[entry.name] = statement


# A Bind of a named statement in a request: the statement, where the message starts, where its portal
# name and statement name end, and its length field.
Bound = tuple[Statement, int, int, int, int]


class ClientStatements:
    """One client's named statements (name -> key) and the state of its message rewriting.

    ``engaged`` is true while a message is split across chunks: the next chunk must come here too.
    """

    __slots__ = ("_held", "_shift", "_shift_at", "_skip", "generation", "names", "t", "z")

    def __init__(self) -> None:
        self.names: dict[bytes, Statement] = {}
        self.generation = 0
        self.z = 0  # the position of the next message for the server (see the module docstring)
        self.t = 0
        # Messages added or answered here make the server's count differ from the client's (which the
        # scanner keeps): the difference holds until the batch ends, for (server, z) only.
        self._shift = 0
        self._shift_at: tuple[ServerStatements, int] | None = None
        self._held = b""
        self._skip = 0

    @property
    def engaged(self) -> bool:
        return bool(self._held or self._skip)

    def bound(self, data: bytes) -> list[Bound] | None:
        """The Binds of a request that is whole messages that only bind named statements, describe
        portals, execute and sync (a request a server that has them all only renames); else ``None``.
        """
        found: list[Bound] = []
        names = self.names
        pos, n = 0, len(data)
        while pos + 5 <= n:
            kind = data[pos]
            (length,) = _U32.unpack_from(data, pos + 1)
            end = pos + 1 + length
            if end > n:
                return None
            if kind == _B:
                portal_end = data.find(0, pos + 5, end)
                name_end = data.find(0, portal_end + 1, end) if portal_end >= 0 else -1
                statement = names.get(data[portal_end + 1 : name_end]) if name_end > portal_end + 1 else None
                if statement is None or statement.failed:
                    return None
                found.append((statement, pos, portal_end, name_end, length))
            elif kind == _D:
                if length < 6 or data[pos + 5] != _PORTAL:
                    return None
            elif kind != _E and kind != _S:  # noqa: PLR1714
                return None
            pos = end
        return found if found and pos == n else None

    def rename(self, data: bytes, server: ServerStatements, binds: list[Bound], z: int) -> bytes:
        """:meth:`rewrite` for a request :meth:`bound` accepted, on a server that has all its statements.

        The shortcut for pipelined requests: no walk, no answers, and the position state ends where
        :meth:`rewrite` would leave it after the request's one Sync (``z`` is the request's position).
        """
        cache = server.cache
        out: list[bytes] = []
        run = 0
        for statement, pos, portal_end, name_end, length in binds:
            key = statement.key
            server_name = cache[key]
            cache.move_to_end(key)
            server.stats["hit"] += 1
            out.append(data[run:pos])
            out.append(
                b"B"
                + _U32.pack(length - (name_end - portal_end - 1) + len(server_name))
                + data[pos + 5 : portal_end + 1]
                + server_name
                + b"\x00"
            )
            run = name_end + 1
        out.append(data[run:])
        self.z = z + 1
        self.t = 0
        self._shift = 0
        self._shift_at = (server, self.z)
        return b"".join(out)

    def reprepare(self, data: bytes, server: ServerStatements, binds: list[Bound], z: int) -> bytes:
        """:meth:`rename` behind a transaction pooler, for a request :meth:`ServerStatements.reprepares` accepts.

        The statement is parsed again (with its pinned parameter types) and described in front of the
        Bind, as the unnamed statement (its backend may be any, and nothing is left there for others to
        see or trip over), so the answer starts with what :class:`AnswerHead` checks and removes; nothing
        else is rewritten, so the request may be pipelined like a plain one. The request has no unnamed
        statement of the client's to displace: :meth:`bound` accepts only Binds of named statements.
        """
        ((statement, _, portal_end, name_end, length),) = binds
        server.stats["miss"] += 1
        self.z = z + 1
        self.t = 0
        self._shift = 0
        self._shift_at = (server, self.z)
        return b"".join(
            (
                _parse(b"", statement.pinned),
                _DESCRIBE_UNNAMED,
                b"B",
                _U32.pack(length - (name_end - portal_end - 1)),
                data[5 : portal_end + 1],
                b"\x00",
                data[name_end + 1 :],
            )
        )

    def reprepared_binds(
        self, data: bytes, server: ServerStatements, scanner: FrontendScanner, *, owed: int, head_owed: bool
    ) -> list[Bound] | None:
        """The Binds of ``data`` if it is a request :meth:`reprepare` serves on ``server`` now, else ``None``.

        Behind a transaction pooler only, for a request of Binds first in its batch (``scanner``: where its first
        named message is), with nothing of the client's outstanding (``owed`` ReadyForQuery, an answer head).
        """
        if (
            not server.transaction
            or self.engaged
            or owed != 0
            or head_owed
            or scanner.named_at != 0
            or scanner.named_syncs != 0
            or scanner.named_batch != 0
        ):
            return None
        binds = self.bound(data)
        return binds if binds is not None and server.reprepares(binds) else None

    def forward(
        self, data: bytes, server: ServerStatements, scanner: FrontendScanner, position: int
    ) -> tuple[bytes, bytes, bytes, str | None]:
        """A chunk naming a statement, for ``server``: (its messages before the first named one, which go as they
        are; the rest, rewritten; answers for the client now; the protocol violation that stopped the rewriting).

        ``position``: the server's ReadyForQuery seen + owed before the chunk; the rest starts there, at its
        place in the current batch. While a message is split across chunks (``engaged``), the chunk continues
        the last one. The scanner then flags the next chunk as :meth:`rewrite_chunk` says.
        """
        head = b""
        start: tuple[int, int] | None = None
        if not self.engaged:
            at = scanner.named_at
            start = (position + scanner.named_syncs, scanner.named_batch)
            if at:
                head, data = data[:at], data[at:]
        try:
            out, answers = self.rewrite(data, server, start)
        except ProtocolError as exc:
            return head, b"", b"", str(exc)
        scanner.named_at = 0 if self.engaged else -1
        return head, out, answers, None

    def rewrite_chunk(
        self, data: bytes, server: ServerStatements, start: tuple[int, int] | None, scanner: FrontendScanner
    ) -> tuple[bytes, bytes]:
        """:meth:`rewrite` for one chunk the client sent: its scanner then sends the next chunk here (named_at 0)
        while a message is split across chunks, and stops flagging chunks otherwise (-1) until one names a
        statement again."""
        out = self.rewrite(data, server, start)
        scanner.named_at = 0 if self.engaged else -1
        return out

    def clear(self) -> None:
        """DISCARD ALL / DEALLOCATE ALL ran in this client's session."""
        self.names.clear()
        self.generation += 1

    def rewrite(  # noqa: PLR0912, PLR0915 - per-message loop on the hot path: a call per message costs throughput
        self, data: bytes, server: ServerStatements, start: tuple[int, int] | None = None
    ) -> tuple[bytes, bytes]:
        """Rewrite client bytes bound for ``server``; return (bytes for the server, answers for the client now).

        ``start`` is the position of the first message in ``data`` as the client sent it: ReadyForQuery
        the server has sent or owes before it, and the client's messages before it in its batch that
        the server answers (the scanner counts both); ``None`` continues the last call.
        """
        out: list[bytes] = []
        answers: list[bytes] = []
        if start is not None:
            self._begin_batch(server, start, out)
        if self._held:
            data = self._held + data
            self._held = b""
        n = len(data)
        pos = 0
        if self._skip:  # the rest of a Bind or pass-through message (never after orphans: start is None)
            if self._skip >= n:
                self._skip -= n
                return data, b""
            pos = self._skip
            self._skip = 0
        run = 0
        names = self.names
        t = self.t  # kept in a local on this per-message loop; self.t is current around the calls below
        while pos < n:
            if n - pos < 5:
                self._held = data[pos:]
                break
            kind = data[pos]
            (length,) = _U32.unpack_from(data, pos + 1)
            end = pos + 1 + length
            if kind == _B:
                limit = min(end, n)
                portal_end = data.find(0, pos + 5, limit)
                name_end = data.find(0, portal_end + 1, limit) if portal_end >= 0 else -1
                if name_end < 0:
                    if end <= n:
                        raise ProtocolError("client sent a Bind message without its portal and statement names")
                    self._held = data[pos:]
                    break
                name = data[portal_end + 1 : name_end]
                statement = names.get(name) if name else None
                if statement is not None:
                    if pos > run:
                        out.append(data[run:pos])
                    self.t = t
                    server_name = self._prepared_on(server, statement, out)
                    t = self.t
                    out.append(
                        b"B"
                        + _U32.pack(length - len(name) + len(server_name))
                        + data[pos + 5 : portal_end + 1]
                        + server_name
                        + b"\x00"
                    )
                    run = name_end + 1
                t += 1
            elif kind == _E:
                t += 1
            elif kind == _S or kind == _Q or kind == _F:  # noqa: PLR1714, SIM109 - cheaper than a tuple
                if kind == _S and server.transaction and server.cache and server.cache_z == self.z:
                    if pos > run:
                        out.append(data[run:pos])
                        run = pos
                    self.t = t
                    self._close_batch(server, out)
                self.z += 1
                t = 0
                self._shift = 0
            elif kind == _P:
                if end > n:
                    self._held = data[pos:]
                    break
                name_end = data.find(0, pos + 5, end)
                if name_end < 0:
                    raise ProtocolError("client sent a Parse message without a statement name")
                if name_end == pos + 5:
                    t += 1  # the unnamed statement: PostgreSQL's own transaction-scoped one
                else:
                    if pos > run:
                        out.append(data[run:pos])
                    self.t = t
                    self._parse(server, data[pos + 5 : name_end], data[name_end + 1 : end], out, answers)
                    t = self.t
                    run = end
            elif kind == _D or kind == _C:  # noqa: PLR1714, SIM109
                if end > n:
                    self._held = data[pos:]
                    break
                if length < 6 or data[end - 1] != 0:
                    raise ProtocolError(f"client sent a malformed {chr(kind)} message")
                if data[pos + 5] == _STATEMENT and length > 6:
                    if pos > run:
                        out.append(data[run:pos])
                    run = end
                    self.t = t
                    self._statement_message(kind, data[pos:end], server, out, answers)
                    t = self.t
                else:
                    t += 1
            if end > n:
                self._skip = end - n
                pos = n
                break
            pos = end
        self.t = t
        # What the sidecar added or answered itself makes the server's count differ from the client's
        # (which the scanner keeps) until this batch ends.
        self._shift_at = (server, self.z)
        stop = n - len(self._held)
        if not out:
            return (data if stop == n and run == 0 else data[run:stop]), b"".join(answers)
        if stop > run:
            out.append(data[run:stop])
        return b"".join(out), b"".join(answers)

    # ------------------------------------------------------------- per-message decisions

    def _begin_batch(self, server: ServerStatements, start: tuple[int, int], out: list[bytes]) -> None:
        """A new batch of client messages: where it starts, and the Closes of names a skipped Close left."""
        self.z, self.t = start
        if self._shift_at == (server, self.z):
            self.t += self._shift
        else:
            self._shift = 0
        if server.orphans:
            orphans, server.orphans = server.orphans, []  # a skipped Close puts its name back
            for server_name in orphans:
                self._inject(server, _CLOSE, _close_statement(server_name), server_name=server_name, out=out)

    def _statement_message(
        self, kind: int, message: bytes, server: ServerStatements, out: list[bytes], answers: list[bytes]
    ) -> None:
        """A client's Describe or Close of a named statement: renamed, or (a Close) answered here."""
        name = message[6:-1]
        if kind == _C:
            self._synthesise_close(server, name, self.names.pop(name, None), answers)
            return
        statement = self.names.get(name)
        if statement is not None:
            out.append(_describe_statement(self._prepared_on(server, statement, out)))
            capture = _Expect(_CAPTURE, self.z, self.t)
            capture.statement = statement
            server._add(capture)
        else:
            out.append(message)
        self.t += 1

    def _parse(self, server: ServerStatements, name: bytes, key: bytes, out: list[bytes], answers: list[bytes]) -> None:
        if name in self.names:
            # PostgreSQL refuses a second Parse of a live name and skips the rest of the batch; let the
            # server fail right here so the skip (and an explicit transaction's abort) really happens.
            text = f'prepared statement "{name.decode("utf-8", "replace")}" already exists'
            self._inject(
                server, _FAIL, _describe_statement(_MISSING_NAME), out=out, error=error_response("42P05", text)
            )
            self._shift -= 1  # it replaced the client's Parse
            return
        statement = self.names[name] = Statement(key)
        stats = server.stats
        cache = server._cache_for(self.z)
        # Even where the server has the statement, it is prepared afresh: a client prepares again after
        # PostgreSQL told it the statement's result type changed (0A000), and must then get a new one.
        stats["miss"] += 1
        cached = key in cache
        server_name = cache[key] = self._drop_name(server, key, out)
        self._inject(
            server,
            _PARSE,
            _parse(server_name, key),
            key=key,
            server_name=server_name,
            out=out,
            statement=statement,
            name=name,
            cached=cached,
        )
        self._shift -= 1  # it replaced the client's Parse
        self._evict(server, out)

    def _prepared_on(self, server: ServerStatements, statement: Statement, out: list[bytes]) -> bytes:
        """The server-side name of ``statement``, preparing it there first (answer swallowed) if needed.

        A Parse sent here keeps the parameter types the statement was described with (Statement.pinned).
        """
        key = statement.key
        cache = server._cache_for(self.z)
        server_name = cache.get(key)
        if server_name is not None:
            cache.move_to_end(key)
            server.stats["hit"] += 1
            return server_name
        server.stats["miss"] += 1
        server_name = cache[key] = self._drop_name(server, key, out)
        self._inject(
            server, _INJECTED, _parse(server_name, statement.pinned), key=key, server_name=server_name, out=out
        )
        self._evict(server, out)
        return server_name

    def _close_batch(self, server: ServerStatements, out: list[bytes]) -> None:
        """Behind a transaction pooler, before a batch's Sync: close what it prepared (answers swallowed).

        The backend goes to other clients, other sidecars' too, after the Sync; nothing of this client's
        stays there for them to see in ``pg_prepared_statements``. (After an error PostgreSQL skips these
        Closes; the names left then are closed before their next Parse anyway.)
        """
        for server_name in server.cache.values():
            self._inject(server, _DROP, _close_statement(server_name), server_name=server_name, out=out)
        server.cache.clear()

    def _drop_name(self, server: ServerStatements, key: bytes, out: list[bytes]) -> bytes:
        """The server name for ``key``, closed first (answer swallowed) so that a Parse of it cannot fail.

        The name is a digest of the key, so whatever holds it upstream, left by an earlier batch, an
        earlier sidecar or another sidecar sharing the pooler's backends, stands for the same text and
        parameter types; closing it first (not an error when it does not exist) makes the Parse that
        follows succeed whether or not the backend this batch lands on has it.
        """
        server_name = _server_name(key)
        self._inject(server, _DROP, _close_statement(server_name), server_name=server_name, out=out)
        return server_name

    def _evict(self, server: ServerStatements, out: list[bytes]) -> None:
        cache = server.cache
        while len(cache) > server.limit:
            _, victim = cache.popitem(last=False)
            server.stats["eviction"] += 1
            self._inject(server, _CLOSE, _close_statement(victim), server_name=victim, out=out)

    def _inject(
        self,
        server: ServerStatements,
        action: int,
        message: bytes,
        *,
        out: list[bytes],
        key: bytes = b"",
        server_name: bytes = b"",
        statement: Statement | None = None,
        name: bytes = b"",
        error: bytes = b"",
        cached: bool = False,
    ) -> None:
        entry = _Expect(action, self.z, self.t)
        entry.cached = cached
        entry.key = key
        entry.server_name = server_name
        entry.error = error
        if statement is not None:
            entry.statement = statement
            entry.name = name
            entry.client = self
            entry.generation = self.generation
        server._add(entry)
        out.append(message)
        self.t += 1
        self._shift += 1

    def _synthesise_close(
        self, server: ServerStatements, name: bytes, statement: Statement | None, answers: list[bytes]
    ) -> None:
        self._shift -= 1  # the client's message, answered here
        entry = _Expect(_SYNTH_CLOSE, self.z, self.t)
        entry.name = name
        entry.statement = statement
        entry.client = self
        entry.generation = self.generation
        due = server._due(self.z, self.t)
        if due > 0:
            answers.append(_CLOSE_COMPLETE)
        elif due < 0:
            server._undo(entry)
        else:
            server._add(entry)


@functools.lru_cache(maxsize=4096)
def _server_name(key: bytes) -> bytes:
    """A statement's name upstream: a digest of its text and types, so a name always means the same SQL.

    Cached: behind a transaction pooler every request that binds a statement needs its name (and a
    bytes object keeps its hash, so the lookup costs less than the digest).
    """
    return SERVER_NAME_PREFIX + hashlib.blake2b(key, digest_size=12).hexdigest().encode()


def _parse(server_name: bytes, key: bytes) -> bytes:
    return b"P" + _U32.pack(4 + len(server_name) + 1 + len(key)) + server_name + b"\x00" + key


def _describe_statement(server_name: bytes) -> bytes:
    return b"D" + _U32.pack(4 + 1 + len(server_name) + 1) + b"S" + server_name + b"\x00"


def _close_statement(server_name: bytes) -> bytes:
    return b"C" + _U32.pack(4 + 1 + len(server_name) + 1) + b"S" + server_name + b"\x00"
