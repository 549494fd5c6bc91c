"""The login handshake (login.py) without a socket: packets in, actions out, as PostgreSQL decides them."""

from __future__ import annotations

import struct

import pytest
from scramp import ScramClient

from poolkit.errors import ProtocolError
from poolkit.sidecar.policy.auth import SCRAM, UserStore
from poolkit.sidecar.policy.login import (
    AskPassword,
    Authenticated,
    Cancel,
    Login,
    LoginRules,
    Refuse,
    Send,
    StartTLS,
    WrongPassword,
)
from poolkit.sidecar.wire import protocol

USERS = UserStore({"alice": "wonderland"})
RULES = LoginRules(users=USERS, database="app", admin_database="pgbouncer")


def startup(params: dict[str, str], minor: int = 0) -> bytes:
    """A StartupMessage (for the pool's database "app" unless ``params`` names one)."""
    if "user" in params and "database" not in params and params["user"] != "app":
        params = {**params, "database": "app"}
    packet = protocol.startup_message(params)
    if minor:
        packet = packet[:4] + struct.pack("!I", (3 << 16) | minor) + packet[8:]
    return packet


def sasl(kind: bytes, payload: bytes) -> bytes:
    return protocol.message(kind, payload)


def password_exchange(login: Login, user: str, password: str) -> list[object]:
    """Run SCRAM with scramp's client; the actions of the last step."""
    client = ScramClient([SCRAM], user, password)
    first = login.feed(protocol.sasl_initial_response(SCRAM, client.get_client_first().encode()), RULES)
    assert len(first) == 1
    assert isinstance(first[0], Send)
    kind, body = next(iter(protocol.MessageReader(side="server").feed(first[0].data)))
    code, data = protocol.parse_auth_request(body)
    assert (kind, code) == (b"R", 11)  # AuthenticationSASLContinue
    client.set_server_first(data.decode())
    return list(login.feed(protocol.password_message(client.get_client_final().encode()), RULES))


def test_scram_with_the_right_password_authenticates() -> None:
    login = Login()
    actions = login.feed(startup({"user": "alice", "database": "app", "application_name": "x"}), RULES)
    assert actions == [AskPassword(protocol.auth_sasl([SCRAM]))]
    assert login.authenticating
    assert (login.user, login.database, login.admin, login.wanted) == ("alice", "app", False, {"application_name": "x"})
    (done,) = password_exchange(login, "alice", "wonderland")
    assert isinstance(done, Authenticated)
    assert done.auth_messages.endswith(protocol.auth_ok())


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("mallory", "wonderland")])
def test_scram_with_a_wrong_password_or_user_fails(user: str, password: str) -> None:
    login = Login()
    login.feed(startup({"user": user}), RULES)
    assert password_exchange(login, user, password) == [
        WrongPassword(f'password authentication failed for user "{user}"')
    ]


def test_an_unoffered_sasl_mechanism_is_refused() -> None:
    login = Login()
    login.feed(startup({"user": "alice"}), RULES)
    actions = login.feed(protocol.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abc"), RULES)
    assert actions == [Refuse("28000", f"SASL mechanism SCRAM-SHA-1 is not offered; use {SCRAM}")]


def test_a_message_other_than_a_sasl_response_during_auth_is_a_protocol_error() -> None:
    login = Login()
    login.feed(startup({"user": "alice"}), RULES)
    with pytest.raises(ProtocolError, match="expected a SASL response"):
        login.feed(protocol.query("SELECT 1"), RULES)


def test_trust_admits_loopback_clients_only() -> None:
    trust = LoginRules(users=USERS, database="app", admin_database="pgbouncer", trust=True, loopback=True)
    assert Login().feed(startup({"user": "bob"}), trust) == [Authenticated(protocol.auth_ok())]
    remote = LoginRules(users=USERS, database="app", admin_database="pgbouncer", trust=True, peer="10.0.0.9:5")
    (refused,) = Login().feed(startup({"user": "bob"}), remote)
    assert isinstance(refused, Refuse)
    assert refused.code == "28000"
    assert "not 10.0.0.9:5" in refused.text


def test_bytes_after_the_startup_packet_are_kept_for_after_login() -> None:
    trust = LoginRules(users=USERS, database="app", admin_database="pgbouncer", trust=True, loopback=True)
    login = Login()
    early = protocol.query("SELECT 1")
    assert login.feed(startup({"user": "bob"}) + early, trust) == [Authenticated(protocol.auth_ok())]
    assert login.early == early


def test_a_startup_packet_in_pieces_waits_for_the_rest() -> None:
    packet = startup({"user": "alice"})
    login = Login()
    assert login.feed(packet[:5], RULES) == []
    assert login.feed(packet[5:], RULES) == [AskPassword(protocol.auth_sasl([SCRAM]))]


@pytest.mark.parametrize(
    ("params", "rules", "code", "text"),
    [
        ({"database": "app"}, RULES, "28000", "no PostgreSQL user name"),
        (
            {"user": "alice"},
            LoginRules(users=USERS, database="app", admin_database="pgbouncer", tls_required=True),
            "28000",
            "client_tls=require",
        ),
        ({"user": "alice", "options": "-c x=1"}, RULES, "08P01", "'options' is not supported"),
        ({"user": "alice", "replication": "database"}, RULES, "0A000", "replication=database"),
        ({"user": "alice", "database": "other"}, RULES, "3D000", 'database "other" does not exist'),
        ({"user": "alice", "bad name": "1"}, RULES, "42704", "invalid startup parameter name 'bad name'"),
    ],
)
def test_startup_refusals_in_postgresqls_order(params: dict[str, str], rules: LoginRules, code: str, text: str) -> None:
    (refused,) = Login().feed(startup(params), rules)
    assert isinstance(refused, Refuse)
    assert refused.code == code
    assert text in refused.text


@pytest.mark.parametrize("value", ["false", "off", "no", "0", "OFF"])
def test_replication_off_is_an_ordinary_login(value: str) -> None:
    assert Login().feed(startup({"user": "alice", "replication": value}), RULES) == [
        AskPassword(protocol.auth_sasl([SCRAM]))
    ]


def test_a_newer_minor_version_or_pq_options_are_negotiated_down_first() -> None:
    actions = Login().feed(startup({"user": "alice", "_pq_.x": "1"}, minor=2), RULES)
    assert actions == [
        Send(protocol.negotiate_protocol_version(0, ["_pq_.x"])),
        AskPassword(protocol.auth_sasl([SCRAM])),
    ]
    # The negotiation comes before a refusal too.
    actions = Login().feed(startup({"database": "app"}, minor=1), RULES)
    assert isinstance(actions[0], Send)
    assert isinstance(actions[1], Refuse)


def test_the_admin_database_is_the_console_and_names_keep_their_spelling() -> None:
    login = Login()
    login.feed(startup({"user": "alice", "database": "pgbouncer", "Application_Name": "psql"}), RULES)
    assert login.admin
    assert login.wanted == {"application_name": "psql"}
    assert login.spelling == {"application_name": "Application_Name"}
    plain = Login()
    plain.feed(protocol.startup_message({"user": "app"}), RULES)  # the database defaults to the user name
    assert (plain.database, plain.admin) == ("app", False)


def test_ssl_gss_and_cancel_requests() -> None:
    offered = LoginRules(users=USERS, database="app", admin_database="pgbouncer", tls_offered=True)
    assert Login().feed(protocol.ssl_request(), offered) == [StartTLS()]
    assert Login().feed(protocol.ssl_request(), RULES) == [Send(b"N")]
    gss = struct.pack("!II", 8, protocol.GSSENC_REQUEST_CODE)
    assert Login().feed(gss, RULES) == [Send(b"N")]
    assert Login().feed(protocol.cancel_request(42, -7), RULES) == [Cancel(42, -7)]
    # After "N" the client goes on with its startup packet on the same login.
    login = Login()
    login.feed(protocol.ssl_request(), RULES)
    assert login.feed(startup({"user": "alice"}), RULES) == [AskPassword(protocol.auth_sasl([SCRAM]))]


def test_bytes_after_an_ssl_request_before_its_answer_are_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="after SSLRequest"):
        Login().feed(protocol.ssl_request() + startup({"user": "alice"}), RULES)
