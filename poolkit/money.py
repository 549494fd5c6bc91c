"""Public import path of the idempotent money-movement helpers; the code is in ``poolkit/apps/money.py``."""

from __future__ import annotations

from poolkit.apps.money import DEFAULT_TABLE, RETRYABLE_SQLSTATES, ensure_table, idempotent, quote_table, request_hash

__all__ = ["DEFAULT_TABLE", "RETRYABLE_SQLSTATES", "ensure_table", "idempotent", "quote_table", "request_hash"]
