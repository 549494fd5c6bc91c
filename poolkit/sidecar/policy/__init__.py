"""Sidecar layer 2, policy: pure decisions (login, pooling, sessions, prepared, pipelining); no sockets, no loop."""
