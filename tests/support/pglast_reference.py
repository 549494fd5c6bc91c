"""pglast (PostgreSQL's own parser) as the reference the routing lexer is checked and measured against.

Only ``tests/test_routing.py`` and ``bench/bench_routing.py`` use it: ``poolkit.routing`` classifies with its
hand-written lexer (why: the module docstring there, numbers from ``bench/bench_routing.py``). The rules are the
lexer's, on pglast's node names; the small decisions both share (which function is which reason, how a boolean
reads) come from ``poolkit.sql.routing`` so that a disagreement points at the reading of the SQL, not at a table.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pglast.parser import ParseError, parse_sql_json

from poolkit.sql.routing import CATALOG_RELATIONS, PLANNER_ONLY_SETTINGS, POOLED, Decision, Route
from poolkit.sql.routing import _bool_text as bool_text
from poolkit.sql.routing import _first as first_reason
from poolkit.sql.routing import _function_reason as function_reason

__all__ = ["classify_pglast"]

_PSYCOPG_PLACEHOLDER = re.compile(r"%\(\w+\)s|%s")
_CURSOR_OPT_HOLD = 0x20  # parsenodes.h
_POOLED_STATEMENTS = frozenset(
    {
        "TransactionStmt",
        "VariableShowStmt",
        "ConstraintsSetStmt",
        "NotifyStmt",
        "LockStmt",
        "TruncateStmt",
        "CallStmt",
        "FetchStmt",
        "ClosePortalStmt",
    }
)
_DML = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_PERSISTENCE = {
    "CreateStmt": ("relation",),
    "CreateTableAsStmt": ("into", "rel"),
    "ViewStmt": ("view",),
    "CreateSeqStmt": ("sequence",),
}


def _bool(node: Any) -> bool | None:
    if not isinstance(node, dict):
        return None
    if "TypeCast" in node:
        return _bool(node["TypeCast"].get("arg"))
    const = node.get("A_Const")
    if not isinstance(const, dict):
        return None
    if "boolval" in const:
        return bool(const["boolval"].get("boolval", False))
    if "sval" in const:
        return bool_text(const["sval"].get("sval", ""))
    return None


def _set_config_local(args: list[Any]) -> bool | None:
    """The lexer's ``_lex_bool_arg`` for pglast's tree."""
    const = args[0].get("A_Const") if args and isinstance(args[0], dict) else None
    if isinstance(const, dict) and str(const.get("sval", {}).get("sval", "")).lower() in PLANNER_ONLY_SETTINGS:
        return True
    return _bool(args[2]) if len(args) > 2 else None


def _dml(root: Any) -> str:
    found: set[str] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        relname = node.get("relname")
        if isinstance(relname, str):
            schema = node.get("schemaname")
            if schema in ("pg_catalog", "information_schema") or (schema is None and relname in CATALOG_RELATIONS):
                found.add("catalog")
            elif schema == "pg_temp":
                found.add("temp_table")
        call = node.get("FuncCall")
        if isinstance(call, dict):
            names = [part.get("String", {}).get("sval", "") for part in call.get("funcname", [])]
            schema = names[0] if len(names) > 1 else None
            if schema == "information_schema":
                found.add("catalog")
            elif schema == "pg_temp":
                found.add("temp_table")
            elif schema in (None, "pg_catalog") and names:
                args = call.get("args", [])
                third = _set_config_local(args) if names[-1] == "set_config" else None
                reason = function_reason(names[-1], third)
                if reason:
                    found.add(reason)
        into = node.get("intoClause")
        if isinstance(into, dict):
            found.add("temp_table" if into.get("rel", {}).get("relpersistence") == "t" else "ddl")
        stack.extend(node.values())
    return first_reason(found)


def _statement(stmt: dict[str, Any]) -> str:  # noqa: PLR0911, PLR0912 - the same rules as routing._lex_statement, on pglast's node names
    ((name, body),) = stmt.items()
    if name in _DML:
        return _dml(body)
    if name in _POOLED_STATEMENTS:
        return ""
    if name == "VariableSetStmt":
        if body.get("is_local"):
            return ""
        variable = body.get("name", "")
        if variable in ("role", "session_authorization"):
            return "set_role"
        return "" if variable == "TRANSACTION" else "session_set"
    if name in ("DiscardStmt", "LoadStmt"):
        return "session_set"
    if name in ("ListenStmt", "UnlistenStmt"):
        return "listen"
    if name in ("PrepareStmt", "ExecuteStmt", "DeallocateStmt"):
        return "prepare"
    if name == "DeclareCursorStmt":
        return "hold_cursor" if body.get("options", 0) & _CURSOR_OPT_HOLD else _dml(body.get("query"))
    if name == "CopyStmt":
        return "copy" if body.get("filename") or body.get("is_program") else _dml(body)
    if name == "ExplainStmt":
        return _statement(body["query"])
    path = _PERSISTENCE.get(name)
    if path is not None:
        rel = body
        for key in path:
            rel = rel.get(key, {})
        return "temp_table" if rel.get("relpersistence") == "t" else "ddl"
    return "ddl"


def classify_pglast(sql: str) -> Decision | None:
    """What :func:`poolkit.routing.classify` should answer, read by pglast; None when pglast cannot parse ``sql``.

    psycopg's ``%s`` / ``%(name)s`` placeholders become ``$1`` first (PostgreSQL's grammar has no others).
    """
    text = _PSYCOPG_PLACEHOLDER.sub("$1", sql).replace("%%", "%") if "%" in sql else sql
    try:
        tree = json.loads(parse_sql_json(text))
    except ParseError:
        return None
    for raw in tree.get("stmts", []):
        stmt = raw.get("stmt")
        if stmt:
            reason = _statement(stmt)
            if reason:
                return Decision(Route.DIRECT, reason)
    return POOLED
