"""Public import path of the statement router (which SQL needs the direct URL); code: ``poolkit/sql/routing.py``."""

from __future__ import annotations

from poolkit.sql.routing import (
    CATALOG_RELATIONS,
    INTROSPECTION_FUNCTIONS,
    POOLED,
    REASONS,
    Decision,
    Route,
    Token,
    classify,
    statement_reason,
    statements,
)

__all__ = [
    "CATALOG_RELATIONS",
    "INTROSPECTION_FUNCTIONS",
    "POOLED",
    "REASONS",
    "Decision",
    "Route",
    "Token",
    "classify",
    "statement_reason",
    "statements",
]
