"""Authentication: client SCRAM-SHA-256 (scramp) and user lists; upstream SCRAM/md5/password; TLS contexts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from scramp import ScramClient, ScramException, ScramMechanism

from poolkit.core.dsn import Dsn
from poolkit.errors import AuthenticationFailed, ConfigError, ProtocolError
from poolkit.sidecar.wire import protocol

SCRAM = "SCRAM-SHA-256"
_MECHANISM = ScramMechanism(SCRAM)
_VERIFIER = re.compile(r"^SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$")

# (salt, stored_key, server_key, iterations), scramp's auth_fn shape.
AuthInfo = tuple[bytes, bytes, bytes, int]


def auth_info_from_secret(secret: str) -> AuthInfo:
    """A password or a ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` verifier -> auth info.

    A plain password is hashed once here (4096 PBKDF2 iterations), so each login afterwards only
    costs a few HMACs: that keeps ``pgbench -C`` style reconnects cheap.
    """
    match = _VERIFIER.match(secret)
    if match:
        iterations, salt, stored, server = match.groups()
        return base64.b64decode(salt), base64.b64decode(stored), base64.b64decode(server), int(iterations)
    if secret.startswith("md5") and len(secret) == 35:
        raise ConfigError(
            "an md5 password hash cannot be used for SCRAM client auth: give the plain password or a "
            "SCRAM-SHA-256 verifier (SELECT rolpassword FROM pg_authid)"
        )
    salt, stored, server, iterations = _MECHANISM.make_auth_info(secret, iteration_count=4096)
    return salt, stored, server, iterations


def is_scram_verifier(secret: str) -> bool:
    """Is ``secret`` a ``SCRAM-SHA-256$...`` verifier rather than a password?"""
    return bool(_VERIFIER.match(secret))


def read_auth_file(path: Path) -> dict[str, str]:
    """Parse a PgBouncer ``userlist.txt``: lines of ``"user" "password-or-verifier"``."""
    users: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(";") or line.startswith("#"):
            continue
        fields = re.findall(r'"((?:[^"]|"")*)"', line)
        if len(fields) < 2:
            raise ConfigError(f'{path}:{number}: expected "user" "password" (auth_file, PgBouncer userlist format)')
        users[fields[0].replace('""', '"')] = fields[1].replace('""', '"')
    return users


class UserStore:
    """The users clients may log in as, with their SCRAM secrets computed once."""

    def __init__(self, users: dict[str, str]) -> None:
        self._info = {name: auth_info_from_secret(secret) for name, secret in users.items()}
        # Unknown users go through the same exchange with a throwaway secret, so a failed login
        # does not reveal whether the user exists.
        self._decoy = auth_info_from_secret(secrets.token_urlsafe(24))

    def __contains__(self, user: object) -> bool:
        return user in self._info

    def __len__(self) -> int:
        return len(self._info)

    def names(self) -> list[str]:
        """The configured user names (for SHOW USERS; never their secrets)."""
        return list(self._info)

    def auth_info(self, user: str) -> AuthInfo:
        return self._info.get(user, self._decoy)


class ScramServerExchange:
    """One client's SCRAM-SHA-256 exchange, server side (RFC 5802/7677, no channel binding).

    Hand-written rather than scramp's ScramServer: libpq always sends an empty user name
    (``n=,``, PostgreSQL takes the name from the startup packet), which scramp rejects as
    malformed, and the client-first message cannot be rewritten because it is signed into the
    proof. scramp still derives the keys (:func:`auth_info_from_secret`).
    """

    def __init__(self, store: UserStore, user: str) -> None:
        self._known = user in store
        self._salt, self._stored_key, self._server_key, self._iterations = store.auth_info(user)
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    @staticmethod
    def _attributes(text: str) -> dict[str, str]:
        attrs: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or len(key) != 1:
                raise AuthenticationFailed("malformed SCRAM message", reason="auth")
            attrs[key] = value
        return attrs

    def first(self, client_first: bytes) -> bytes:
        """SASLInitialResponse data -> server-first message (raises AuthenticationFailed)."""
        try:
            text = client_first.decode()
        except UnicodeDecodeError:
            raise AuthenticationFailed("malformed SCRAM message", reason="auth") from None
        flag, _, rest = text.partition(",")
        authzid, _, bare = rest.partition(",")
        if flag not in ("n", "y") or authzid or not bare:
            # "p=..." asks for channel binding, which is only offered as SCRAM-SHA-256-PLUS.
            raise AuthenticationFailed("unsupported SCRAM channel binding or authzid", reason="auth")
        client_nonce = self._attributes(bare).get("r", "")
        if not client_nonce:
            raise AuthenticationFailed("SCRAM client-first message has no nonce", reason="auth")
        self._gs2_header = f"{flag},,"
        self._client_first_bare = bare
        self._nonce = client_nonce + secrets.token_urlsafe(18)
        salt = base64.b64encode(self._salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self._iterations}"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        """SASLResponse data -> server-final message; raises AuthenticationFailed on a wrong password."""
        failed = AuthenticationFailed("password authentication failed", reason="auth")
        try:
            text = client_final.decode()
        except UnicodeDecodeError:
            raise failed from None
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise failed
        attrs = self._attributes(without_proof)
        expected_binding = base64.b64encode(self._gs2_header.encode()).decode()
        if attrs.get("c") != expected_binding or attrs.get("r") != self._nonce:
            raise failed
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            raise failed from None
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.digest(self._stored_key, auth_message, "sha256")
        if len(proof) != len(signature):
            raise failed
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._stored_key) or not self._known:
            raise failed
        server_signature = hmac.digest(self._server_key, auth_message, "sha256")
        return b"v=" + base64.b64encode(server_signature)


class UpstreamAuth:
    """Answers the upstream server's Authentication requests for the configured user.

    Supports SCRAM-SHA-256 (scramp), md5 and cleartext password; AuthenticationOk (0) needs no answer.
    """

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.password = password
        self._scram: ScramClient | None = None

    def _need_password(self, method: str) -> str:
        if self.password is None:
            raise AuthenticationFailed(
                f"the upstream asked for {method} authentication but the upstream URL has no password",
                reason="auth",
            )
        return self.password

    def respond(self, code: int, data: bytes) -> bytes | None:
        """One Authentication request -> the message to send back (or None)."""
        if code == 0:
            return None
        if code == 3:
            return protocol.password_message(self._need_password("password").encode() + b"\x00")
        if code == 5:
            password = self._need_password("md5")
            inner = hashlib.md5((password + self.user).encode(), usedforsecurity=False).hexdigest()
            outer = hashlib.md5(inner.encode() + data[:4], usedforsecurity=False).hexdigest()
            return protocol.password_message(b"md5" + outer.encode() + b"\x00")
        if code == 10:
            mechanisms = protocol.parse_sasl_mechanisms(data)
            if SCRAM not in mechanisms:
                raise AuthenticationFailed(
                    f"the upstream offers SASL mechanisms {mechanisms}; the sidecar supports {SCRAM}",
                    reason="auth",
                )
            self._scram = ScramClient([SCRAM], self.user, self._need_password("SCRAM-SHA-256"))
            return protocol.sasl_initial_response(SCRAM, self._scram.get_client_first().encode())
        if code == 11:
            if self._scram is None:
                raise ProtocolError("upstream sent SASLContinue before SASL")
            try:
                self._scram.set_server_first(data.decode())
                return protocol.password_message(self._scram.get_client_final().encode())
            except ScramException as exc:
                raise AuthenticationFailed(f"upstream SCRAM exchange failed: {exc}", reason="auth") from None
        if code == 12:
            if self._scram is None:
                raise ProtocolError("upstream sent SASLFinal before SASL")
            try:
                self._scram.set_server_final(data.decode())
            except ScramException:
                raise AuthenticationFailed(
                    "the upstream server's SCRAM signature is wrong: it does not know the password",
                    reason="auth",
                ) from None
            return None
        raise AuthenticationFailed(
            f"the upstream asked for an authentication method the sidecar does not support (code {code}); "
            "use scram-sha-256 or md5 in pg_hba.conf",
            reason="auth",
        )


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How to reach the upstream: ``context`` is None for plain text; ``server_hostname`` for SNI/checks."""

    mode: str
    context: ssl.SSLContext | None
    server_hostname: str | None


def upstream_tls(dsn: Dsn, sslrootcert: Path | None) -> UpstreamTls:
    """Build the TLS client context from the URL's ``sslmode`` (default ``require``) and CA file."""
    mode = dsn.query.get("sslmode", "require")
    if mode in ("disable", "allow") or dsn.is_unix_socket:
        return UpstreamTls("disable", None, None)
    rootcert = dsn.query.get("sslrootcert") or (str(sslrootcert) if sslrootcert else None)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if mode in ("verify-ca", "verify-full"):
        if rootcert and rootcert != "system":
            try:
                ctx.load_verify_locations(cafile=rootcert)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"sslrootcert {rootcert}: cannot load the CA file ({exc})") from None
        ctx.check_hostname = mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        # require/prefer: encrypt without verifying the certificate, as libpq does.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return UpstreamTls(mode, ctx, dsn.host)


def client_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The server-side TLS context for clients connecting to the sidecar."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert_file/tls_key_file: cannot load the certificate ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
