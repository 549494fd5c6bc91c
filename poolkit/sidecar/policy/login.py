"""Sans-IO: one client's login, from its first packet to AuthenticationOk, as actions for the connection to carry out.

A :class:`Login` is fed the bytes a client sends before it is logged in and answers with actions: bytes to
send, TLS to start, a cancel to forward, a refusal (with PostgreSQL's error code), a failed password, or
"authenticated". It decides what PostgreSQL decides at this point (the protocol version, ``options``,
replication connections, the database name, invalid parameter names, trust for loopback clients only, the
SCRAM-SHA-256 exchange) and nothing that needs the sidecar: which pool a user gets, whether a user may open
the admin console and the startup parameters the upstream must check are the connection's to ask
(client.py), after :class:`Authenticated`. Counting logins and logging them is the connection's too, so a
refusal is logged once, with the client it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from poolkit.errors import AuthenticationFailed, ProtocolError
from poolkit.sidecar.policy.auth import SCRAM, ScramServerExchange, UserStore
from poolkit.sidecar.policy.pooling import NOT_SETTINGS, valid_setting_name
from poolkit.sidecar.wire import protocol


@dataclass(frozen=True, slots=True)
class LoginRules:
    """What the sidecar allows at the moment a packet is read (the settings may be reloaded meanwhile)."""

    users: UserStore
    #: The pool's upstream database: the only one a client may name, but for the admin console's.
    database: str
    admin_database: str
    #: auth_type=trust: no password, loopback and Unix-socket clients only.
    trust: bool = False
    #: A TLS context is configured and this connection is not on TLS yet: an SSLRequest gets "S".
    tls_offered: bool = False
    #: client_tls=require and this connection is on neither TLS nor a Unix socket.
    tls_required: bool = False
    loopback: bool = False
    peer: str = "?"


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Answer an SSLRequest with "S", stop reading (the ClientHello is the TLS layer's) and start TLS."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """A CancelRequest: forward it; the connection ends once it is out (PostgreSQL's order)."""

    process_id: int
    secret_key: int


@dataclass(frozen=True, slots=True)
class AskPassword:
    """Send these bytes (AuthenticationSASL) and wait for the SCRAM exchange."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Refuse:
    """End the login with a FATAL ``code`` / ``text`` (logged as a refused login)."""

    code: str
    text: str


@dataclass(frozen=True, slots=True)
class WrongPassword:
    """The SCRAM proof (or the user) was wrong: FATAL 28P01, logged as a failed authentication."""

    text: str


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The client proved who it is: ``auth_messages`` (AuthenticationSASLFinal, AuthenticationOk) are its to
    send once the sidecar has chosen its pool; the login's ``user``, ``database``, ``admin`` and ``wanted``
    say what it asked for."""

    auth_messages: bytes


Action = Send | StartTLS | Cancel | AskPassword | Refuse | WrongPassword | Authenticated

_REPLICATION_OFF = ("false", "off", "no", "0")


class Login:
    """One client's login state: the startup packet reader, then the SCRAM exchange."""

    __slots__ = (
        "_exchange",
        "_reader",
        "_sasl_started",
        "_startup",
        "admin",
        "database",
        "early",
        "spelling",
        "user",
        "wanted",
    )

    def __init__(self) -> None:
        self._startup = protocol.StartupReader()
        self._reader: protocol.MessageReader | None = None  # set while the password exchange runs
        self._exchange: ScramServerExchange | None = None
        self._sasl_started = False
        self.user = ""
        self.database = ""
        self.admin = False
        #: The settings its startup packet asks for, by lower-case name (None until the packet was read).
        self.wanted: dict[str, str] | None = None
        #: Startup parameter names not in lower case, as sent: PostgreSQL's errors name them so.
        self.spelling: dict[str, str] | None = None
        #: Bytes sent after the startup packet, before the sidecar answered it (relayed once logged in).
        self.early = b""

    @property
    def authenticating(self) -> bool:
        """Is the SCRAM exchange under way (the bytes read are SASL messages, not a startup packet)?"""
        return self._reader is not None

    def feed(self, data: bytes, rules: LoginRules) -> list[Action]:
        """What to do about ``data``; raises ProtocolError for bytes no PostgreSQL client sends.

        Nothing is read past a refusal, a cancel, a TLS start or the end of the exchange.
        """
        if self._reader is not None:
            return self._on_auth(data, rules)
        packet = self._startup.feed(data)
        if packet is None:
            return []
        if isinstance(packet, protocol.SSLRequest):
            if self._startup.take_rest():
                raise ProtocolError("data after SSLRequest before the TLS handshake")
            return [StartTLS()] if rules.tls_offered else [Send(b"N")]
        if isinstance(packet, protocol.GSSENCRequest):
            return [Send(b"N")]
        if isinstance(packet, protocol.CancelRequest):
            return [Cancel(packet.process_id, packet.secret_key)]
        return self._on_startup_message(packet, rules)

    def _on_startup_message(self, packet: protocol.StartupMessage, rules: LoginRules) -> list[Action]:  # noqa: PLR0911 - each return refuses the login with its own error, in PostgreSQL's order
        params = packet.params
        self.early = self._startup.take_rest()
        actions: list[Action] = []
        unsupported = [k for k in params if k.startswith("_pq_.")]
        if packet.minor > 0 or unsupported:
            actions.append(Send(protocol.negotiate_protocol_version(0, unsupported)))
        user = params.get("user", "")
        if not user:
            return [*actions, Refuse("28000", "no PostgreSQL user name specified in startup packet")]
        self.user = user
        self.database = params.get("database") or user
        if rules.tls_required:
            return [
                *actions,
                Refuse("28000", "the sidecar requires TLS (client_tls=require): connect with sslmode=require"),
            ]
        if params.get("options", "").strip():
            text = (
                "startup parameter 'options' is not supported by a transaction pooler: use SET inside "
                "transactions or ALTER ROLE ... SET"
            )
            return [*actions, Refuse("08P01", text)]
        replication = params.get("replication", "").lower()
        if replication and replication not in _REPLICATION_OFF:
            text = (
                f"replication connections (replication={replication}) are not relayed by the poolkit sidecar, "
                "a transaction pooler: connect pg_basebackup, pg_receivewal and logical replication "
                "clients to the direct URL (POOLKIT_DIRECT_URL)"
            )
            return [*actions, Refuse("0A000", text)]
        self.admin = self.database == rules.admin_database
        if not self.admin and self.database != rules.database:
            text = (
                f'database "{self.database}" does not exist on this sidecar: it serves '
                f'"{rules.database}" (and the admin console "{rules.admin_database}")'
            )
            return [*actions, Refuse("3D000", text)]
        wanted: dict[str, str] = {}
        for name, value in params.items():
            if name in NOT_SETTINGS or name.startswith("_pq_."):
                continue
            if not valid_setting_name(name) or "\x00" in value:
                return [*actions, Refuse("42704", f"invalid startup parameter name {name!r}")]
            key = name.lower()
            wanted[key] = value
            if key != name:
                # PostgreSQL's error names the parameter as the client spelled it: so must the check's.
                self.spelling = {**(self.spelling or {}), key: name}
        self.wanted = wanted
        if rules.trust:
            if not rules.loopback:
                text = (
                    f"trust authentication only admits loopback and Unix-socket clients, not {rules.peer}: "
                    "configure users (POOLKIT_SIDECAR_USERS) for remote clients"
                )
                return [*actions, Refuse("28000", text)]
            return [*actions, Authenticated(protocol.auth_ok())]
        self._exchange = ScramServerExchange(rules.users, user)
        self._reader = protocol.MessageReader(side="client", max_message_size=protocol.MAX_STARTUP_SIZE)
        return [*actions, AskPassword(protocol.auth_sasl([SCRAM]))]

    def _on_auth(self, data: bytes, rules: LoginRules) -> list[Action]:
        assert self._reader is not None
        actions: list[Action] = []
        for kind, body in self._reader.feed(data):
            action = self._on_auth_message(kind, body)
            actions.append(action)
            if not isinstance(action, Send):
                break  # the exchange is over: nothing after it is read here
        return actions

    def _on_auth_message(self, kind: bytes, body: bytes) -> Action:
        exchange = self._exchange
        if kind != b"p" or exchange is None:
            raise ProtocolError(f"expected a SASL response during authentication, got message {kind!r}")
        try:
            if not self._sasl_started:
                mechanism, data = protocol.parse_sasl_initial_response(body)
                if mechanism != SCRAM:
                    self._exchange = None
                    return Refuse("28000", f"SASL mechanism {mechanism} is not offered; use {SCRAM}")
                self._sasl_started = True
                return Send(protocol.auth_sasl_continue(exchange.first(data)))
            final = exchange.final(body)
        except AuthenticationFailed:
            self._exchange = None
            return WrongPassword(f'password authentication failed for user "{self.user}"')
        self._exchange = None
        return Authenticated(protocol.auth_sasl_final(final) + protocol.auth_ok())
