"""Every error poolkit raises, in one flat hierarchy under :class:`PoolkitError`."""

from __future__ import annotations


class PoolkitError(Exception):
    """Base class of every error poolkit raises.

    Messages say what happened and what to change. They never contain a password,
    a query parameter or a full connection URL.
    """


class ConfigError(PoolkitError, ValueError):
    """A setting or argument has a value poolkit cannot use; the message names it."""


class PoolTimeout(PoolkitError, TimeoutError):
    """No connection became free within the acquire timeout (the pool is exhausted)."""

    def __init__(
        self, message: str, *, pool: str = "", max_size: int = 0, waiting: int = 0, timeout: float = 0.0
    ) -> None:
        super().__init__(message)
        self.pool = pool
        self.max_size = max_size
        self.waiting = waiting
        self.timeout = timeout


class TooManyWaiting(PoolTimeout):
    """The pool is exhausted and ``max_waiting`` callers already wait: this one fails at once instead of queueing.

    A subclass of :class:`PoolTimeout`, so code that handles exhaustion handles this too.
    """


class PoolClosed(PoolkitError):
    """The pool was closed; create a new one (or call ``get_pool()`` again)."""


class ConnectError(PoolkitError, ConnectionError):
    """A connection to PostgreSQL or the pooler could not be opened.

    ``reason`` is a short stable code (``"dns"``, ``"timeout"``, ``"ssl_required"``, ...)
    that tests and metrics can rely on; the message carries the explanation.
    """

    def __init__(self, message: str, *, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


class ConnectTimeout(ConnectError, TimeoutError):
    """The server did not complete the connection handshake within ``connect_timeout``."""


class AuthenticationFailed(ConnectError):
    """The server rejected the user name or password."""


class SSLError(ConnectError):
    """TLS could not be negotiated or verified as ``sslmode`` requires."""


class TooManyConnections(ConnectError):
    """The server refused the connection: it is at ``max_connections`` (SQLSTATE 53300)."""


class SessionStateError(PoolkitError):
    """A statement would leave session state on a transaction pooler's shared server connection.

    ``reason`` is the :func:`poolkit.sql.routing.classify` reason (``set_role``, ``session_set``, ...).
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class PreparedStatementError(PoolkitError):
    """A prepared statement went missing or collided: the connection goes through a transaction pooler."""


class ProtocolError(PoolkitError):
    """A peer sent bytes that are not valid PostgreSQL protocol (the sidecar's codec)."""


class SidecarError(PoolkitError):
    """The sidecar could not start or serve (bad listen address, upstream unusable, ...)."""


class DevStackError(PoolkitError):
    """The local PostgreSQL + PgBouncer stack could not start; the message has the install command."""


class IdempotencyConflict(PoolkitError):
    """An idempotency key was reused with different arguments."""


class CommitOutcomeUnknown(PoolkitError):
    """The connection was lost during COMMIT and the idempotency key could not be checked afterwards."""
