"""Sidecar layer 1, the wire: the PostgreSQL v3 protocol codec, sans-IO."""
