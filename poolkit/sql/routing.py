"""Pure: does this SQL need the direct connection (not the transaction pooler), and why?

A hand-written lexer, not pglast: as correct on the corpus, 1.3–1.8x faster, no extra dependency, and it reads
text pglast rejects (``%s``, ``:name``). Measured by ``bench/bench_routing.py`` against the pglast reference in
``tests/support/pglast_reference.py``; the numbers are in the README ("Lexer, not pglast").

Decisions (documented here because callers and the sidecar rely on them):

* Unknown or unparseable text is pooled: the classifier is a routing aid, not a security
  boundary, and the hard rule is that no DML goes direct by accident.
* ``TRUNCATE``, ``LOCK``, ``NOTIFY``, ``CALL``, ``SHOW``, ``SET LOCAL``, ``SET TRANSACTION``,
  ``SET CONSTRAINTS``, ``PREPARE TRANSACTION``, cursors without ``WITH HOLD`` and
  ``FETCH``/``MOVE``/``CLOSE`` are transaction-scoped: pooled.
* ``DO`` blocks, ``VACUUM``/``ANALYZE``/``CLUSTER``/``REINDEX``/``CHECKPOINT``, ``REFRESH
  MATERIALIZED VIEW`` and every ``CREATE``/``ALTER``/``DROP``/``COMMENT``/``GRANT``/``REVOKE``/
  ``SECURITY LABEL``/``IMPORT FOREIGN SCHEMA``/``REASSIGN OWNED`` are ``ddl``.
* ``CREATE TEMP …`` (table, view, sequence) and ``SELECT … INTO TEMP`` and any ``pg_temp.x``
  reference are ``temp_table``; ``SELECT … INTO t`` (not temporary) is ``ddl``.
* Catalog reads: any relation qualified with ``pg_catalog`` / ``information_schema``, or an
  unqualified relation (in ``FROM``/``JOIN``/… position) whose name is a PostgreSQL system
  catalog or system view (:data:`CATALOG_RELATIONS`). A user table ``public.pg_notes`` or a column
  named ``pg_class`` stays pooled. Introspection functions (``pg_get_*``, ``pg_*_is_visible``,
  ``format_type``, ``obj_description``, … see :data:`INTROSPECTION_FUNCTIONS`) are ``catalog``.
  ``pg_catalog`` used as a type qualifier (``::pg_catalog.int4``) is not.
* ``set_config(name, value, is_local)``: ``true`` is transaction-local (pooled); ``false``, or a
  value not known when classifying (a parameter, an expression), is ``session_set``: leaking
  session state (e.g. RLS claims) to another client is worse than a direct round trip.
* ``COPY … FROM STDIN`` / ``TO STDOUT`` is pooled (transaction poolers carry the COPY
  sub-protocol); ``COPY`` to/from a server file or ``PROGRAM`` is ``copy`` (it needs
  ``pg_read_server_files``/``pg_write_server_files``/``pg_execute_server_program``, which the
  pooler's role usually lacks).
* ``EXPLAIN [ANALYZE] stmt`` is routed as ``stmt``. ``DISCARD`` and ``LOAD`` are ``session_set``;
  ``EXECUTE``/``DEALLOCATE`` are ``prepare`` (they only make sense on the session that prepared).
* A string with several statements is direct if any statement is; the reason is the first
  direct statement's.

Limits (the classifier sees one string, never the session): ``FETCH`` from a ``WITH HOLD`` cursor
or ``EXECUTE`` of a statement prepared earlier cannot be told from their transaction-scoped
forms by text alone (``EXECUTE``/``DEALLOCATE`` are routed direct; ``FETCH``/``CLOSE`` pooled);
a CTE named like a catalog (``WITH pg_class AS …``) counts as a catalog read; Unicode-escaped
identifiers (``U&"\0070g_class"``) are not decoded.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

from poolkit.sql.lex import Token, split_statements, tokenize

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


class Route(enum.StrEnum):
    """Where a statement should run."""

    POOLED = "pooled"
    DIRECT = "direct"


@dataclass(frozen=True, slots=True)
class Decision:
    """A routing decision: ``route`` and a short stable ``reason`` (``""`` when pooled)."""

    route: Route
    reason: str

    @property
    def direct(self) -> bool:
        """True when the statement needs the direct connection."""
        return self.route is Route.DIRECT


# Within one statement, the reason reported when several apply (session state first: it is
# what breaks other clients when it leaks).
_PRIORITY = (
    "set_role",
    "session_set",
    "advisory_lock",
    "listen",
    "prepare",
    "hold_cursor",
    "temp_table",
    "copy",
    "ddl",
    "catalog",
)
#: Every reason a :class:`Decision` to go direct can carry (also metric label values).
#: Pooled decisions carry ``""``.
REASONS: frozenset[str] = frozenset(_PRIORITY)

#: The decision for statements that can run through the transaction pooler.
POOLED = Decision(Route.POOLED, "")

_DECISIONS = {reason: Decision(Route.DIRECT, reason) for reason in REASONS}

#: System catalogs and system views of pg_catalog (PostgreSQL 15's postgres.bki and
#: system_views.sql, plus views added up to 18). Unqualified references to these are catalog reads.
CATALOG_RELATIONS: frozenset[str] = frozenset(
    """
    pg_aggregate pg_am pg_amop pg_amproc pg_attrdef pg_attribute pg_auth_members pg_authid pg_cast
    pg_class pg_collation pg_constraint pg_conversion pg_database pg_db_role_setting pg_default_acl
    pg_depend pg_description pg_enum pg_event_trigger pg_extension pg_foreign_data_wrapper
    pg_foreign_server pg_foreign_table pg_index pg_inherits pg_init_privs pg_language pg_largeobject
    pg_largeobject_metadata pg_namespace pg_opclass pg_operator pg_opfamily pg_parameter_acl
    pg_partitioned_table pg_policy pg_proc pg_publication pg_publication_namespace
    pg_publication_rel pg_range pg_replication_origin pg_rewrite pg_seclabel pg_sequence pg_shdepend
    pg_shdescription pg_shseclabel pg_statistic pg_statistic_ext pg_statistic_ext_data
    pg_subscription pg_subscription_rel pg_tablespace pg_transform pg_trigger pg_ts_config
    pg_ts_config_map pg_ts_dict pg_ts_parser pg_ts_template pg_type pg_user_mapping
    pg_available_extension_versions pg_available_extensions pg_backend_memory_contexts pg_config
    pg_cursors pg_file_settings pg_group pg_hba_file_rules pg_ident_file_mappings pg_indexes
    pg_locks pg_matviews pg_policies pg_prepared_statements pg_prepared_xacts pg_publication_tables
    pg_replication_origin_status pg_replication_slots pg_roles pg_rules pg_seclabels pg_sequences
    pg_settings pg_shadow pg_shmem_allocations pg_stat_activity pg_stat_all_indexes
    pg_stat_all_tables pg_stat_archiver pg_stat_bgwriter pg_stat_database pg_stat_database_conflicts
    pg_stat_gssapi pg_stat_progress_analyze pg_stat_progress_basebackup pg_stat_progress_cluster
    pg_stat_progress_copy pg_stat_progress_create_index pg_stat_progress_vacuum
    pg_stat_recovery_prefetch pg_stat_replication pg_stat_replication_slots pg_stat_slru pg_stat_ssl
    pg_stat_subscription pg_stat_subscription_stats pg_stat_sys_indexes pg_stat_sys_tables
    pg_stat_user_functions pg_stat_user_indexes pg_stat_user_tables pg_stat_wal pg_stat_wal_receiver
    pg_stat_xact_all_tables pg_stat_xact_sys_tables pg_stat_xact_user_functions
    pg_stat_xact_user_tables pg_statio_all_indexes pg_statio_all_sequences pg_statio_all_tables
    pg_statio_sys_indexes pg_statio_sys_sequences pg_statio_sys_tables pg_statio_user_indexes
    pg_statio_user_sequences pg_statio_user_tables pg_stats pg_stats_ext pg_stats_ext_exprs
    pg_tables pg_timezone_abbrevs pg_timezone_names pg_user pg_user_mappings pg_views pg_stat_io
    pg_stat_checkpointer pg_wait_events pg_aios pg_stat_statements
    """.split()  # noqa: SIM905 - reads better as a word list
)

#: Introspection functions migration tools and psql call; ``pg_get_*`` and ``pg_*_is_visible``
#: are matched by pattern as well.
INTROSPECTION_FUNCTIONS: frozenset[str] = frozenset(
    """
    format_type obj_description col_description shobj_description pg_encoding_to_char
    pg_index_column_has_property pg_index_has_property pg_indexam_has_property pg_describe_object
    pg_identify_object pg_identify_object_as_address pg_my_temp_schema pg_is_other_temp_schema
    pg_options_to_table pg_relation_is_publishable pg_settings_get_flags pg_partition_tree
    pg_partition_ancestors pg_partition_root
    """.split()  # noqa: SIM905 - reads better as a word list
)

_ADVISORY_SESSION = frozenset(
    {
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
    }
)
# Unique prefixes PostgreSQL's boolin accepts (case-insensitive, surrounding space ignored).
_BOOL_TRUE = frozenset({"t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"})
_BOOL_FALSE = frozenset({"f", "fa", "fal", "fals", "false", "n", "no", "of", "off", "0"})


def _is_introspection(name: str) -> bool:
    return (
        name in INTROSPECTION_FUNCTIONS
        or name.startswith("pg_get_")
        or (name.startswith("pg_") and name.endswith("_is_visible"))
    )


def _function_reason(name: str, third_arg: bool | None) -> str:
    """Reason for a call of built-in ``name``; ``third_arg`` is set_config's is_local if known."""
    if name in _ADVISORY_SESSION:
        return "advisory_lock"
    if name == "set_config":
        return "" if third_arg is True else "session_set"
    if _is_introspection(name):
        return "catalog"
    return ""


def _bool_text(text: str) -> bool | None:
    value = text.strip().lower()
    if value in _BOOL_TRUE:
        return True
    if value in _BOOL_FALSE:
        return False
    return None


def _first(reasons: set[str]) -> str:
    for reason in _PRIORITY:
        if reason in reasons:
            return reason
    return ""


# --------------------------------------------------------------------------------------------
# Fast path: most application statements are DML that mention nothing a direct decision could
# hang on. Every DML-embedded reason needs one of these substrings (checked by a test), so their
# absence proves the statement pooled without tokenising it.

_DML_HEAD = re.compile(r"\s*(?:select|insert|update|delete|with|values|merge)\b", re.IGNORECASE)
_DML_TRIGGERS = ("pg_", "information_schema", "set_config", "format_type", "_description", ";")


def _fast_pooled(sql: str) -> bool:
    head = _DML_HEAD.match(sql)
    if head is None:
        return False
    low = sql.lower().rstrip().rstrip(";")
    if any(trigger in low for trigger in _DML_TRIGGERS):
        return False
    # `SELECT … INTO t` creates a table; INSERT/MERGE INTO are plain DML.
    return "into" not in low or head.group().lstrip().lower() in ("insert", "merge")


_DML_WORDS = frozenset({"select", "insert", "update", "delete", "merge", "with", "values", "table"})
_DDL_WORDS = frozenset(
    {
        "alter",
        "drop",
        "comment",
        "grant",
        "revoke",
        "reindex",
        "vacuum",
        "analyze",
        "analyse",
        "cluster",
        "refresh",
        "security",
        "import",
        "reassign",
        "checkpoint",
        "do",
    }
)
# Words after which a name is a relation (FROM x, JOIN x, UPDATE x, INTO x, …).
_RELATION_BEFORE = frozenset({"from", "join", "only", "update", "into", "using", "table", "copy"})
# Words after which `name(` is not a call but a relation with a column list.
_NOT_CALL_BEFORE = frozenset({"into", "table", "update", "copy", "only"})
# Clause words that end a FROM list at their nesting level.
_CLAUSE_ENDS = frozenset(
    {
        "select",
        "where",
        "group",
        "having",
        "order",
        "limit",
        "offset",
        "window",
        "returning",
        "set",
        "values",
        "union",
        "intersect",
        "except",
        "fetch",
        "for",
    }
)
_NAME_BEFORE = frozenset(
    {("w", "from"), ("w", "join"), ("o", ","), ("w", "as"), ("w", "update"), ("w", "into"), ("o", ".")}
)
_QUERY_OPENERS = frozenset({"select", "with", "values", "table"})
_NAME_KINDS = ("w", "q")
_TYPE_BEFORE = frozenset({("o", "::"), ("w", "as")})


def _call_args(tokens: list[Token], open_index: int) -> list[list[Token]]:
    """Top-level arguments of the call whose ``(`` is at ``open_index``."""
    args: list[list[Token]] = [[]]
    depth = 0
    for token in tokens[open_index:]:
        if token == ("o", "("):
            depth += 1
            if depth == 1:
                continue
        elif token == ("o", ")"):
            depth -= 1
            if depth == 0:
                break
        elif token == ("o", ",") and depth == 1:
            args.append([])
            continue
        args[-1].append(token)
    return args


#: Settings that change how a query is planned, never its result: a session-level change of one leaves
#: nothing a later transaction could see in its answers. asyncpg turns ``jit`` off around its type
#: introspection (the first array, enum, range or composite result) and back with
#: ``set_config('jit', ..., false)``; treating that as session state would pin, or behind a transaction
#: pooler refuse, every asyncpg client that reads an array.
PLANNER_ONLY_SETTINGS = frozenset({"jit"})


def _lex_bool_arg(tokens: list[Token], open_index: int) -> bool | None:
    """set_config's ``is_local`` if known; ``True`` too for a planner-only setting (see PLANNER_ONLY_SETTINGS)."""
    args = _call_args(tokens, open_index)
    if args and len(args[0]) == 1 and args[0][0][0] == "s" and args[0][0][1].lower() in PLANNER_ONLY_SETTINGS:
        return True
    if len(args) < 3:
        return None
    arg = args[2]
    if len(arg) >= 2 and arg[-2] == ("o", "::"):  # 't'::bool
        arg = arg[:-2]
    if len(arg) != 1:
        return None
    kind, value = arg[0]
    if kind == "w" and value in ("true", "false"):
        return value == "true"
    if kind == "s":
        return _bool_text(value)
    return None


def _lex_dml(tokens: list[Token]) -> str:  # noqa: PLR0912, PLR0915 - one pass over the tokens with the state of each rule side by side
    """Reasons hidden inside a query: catalog relations and functions, SELECT INTO, pg_temp."""
    found: set[str] = set()
    n = len(tokens)
    # Per parenthesis level: is it a query (so FROM lists count) and the clause we are in.
    query_level = [True]
    clause = [""]
    head = tokens[0]
    select_into_possible = head in (("w", "select"), ("w", "with"), ("o", "("))
    prev: Token = ("o", "")
    for i, token in enumerate(tokens):
        kind, value = token
        if kind == "o":
            if value == "(":
                nxt = tokens[i + 1] if i + 1 < n else ("o", "")
                query_level.append(nxt[0] == "w" and nxt[1] in _QUERY_OPENERS)
                clause.append("")
            elif value == ")" and len(query_level) > 1:
                query_level.pop()
                clause.pop()
            prev = token
            continue
        if kind not in _NAME_KINDS:
            prev = token
            continue
        depth = len(query_level) - 1
        nxt = tokens[i + 1] if i + 1 < n else ("o", "")
        # A word right after FROM/JOIN/a comma/AS/a dot is a name (a table called `set`, `public.set`), not a clause.
        if kind == "w" and query_level[depth] and prev not in _NAME_BEFORE:
            if value == "from" and prev != ("w", "distinct"):
                clause[depth] = "from"
            elif value in _CLAUSE_ENDS:
                clause[depth] = ""
            if value == "into" and depth == 0 and select_into_possible and prev[1] not in ("insert", "merge"):
                after = [t[1] for t in tokens[i + 1 : i + 3] if t[0] == "w"]
                temp = bool(after) and (
                    after[0] in ("temp", "temporary")
                    or (after[0] in ("local", "global") and after[1:2] in (["temp"], ["temporary"]))
                )
                found.add("temp_table" if temp else "ddl")
        if prev == ("o", "."):
            prev = token
            continue
        if nxt == ("o", ".") and value in ("pg_catalog", "information_schema", "pg_temp"):
            member = tokens[i + 2] if i + 2 < n else ("o", "")
            after_member = tokens[i + 3] if i + 3 < n else ("o", "")
            if prev in _TYPE_BEFORE or after_member[0] == "s":
                pass  # a type name: ::pg_catalog.int4, CAST(x AS pg_catalog.text), pg_catalog.text 'x'
            elif value == "pg_temp":
                found.add("temp_table")
            elif value == "information_schema":
                found.add("catalog")
            elif member[0] in _NAME_KINDS:
                if after_member == ("o", "("):
                    reason = _function_reason(
                        member[1], _lex_bool_arg(tokens, i + 3) if member[1] == "set_config" else None
                    )
                    if reason:
                        found.add(reason)
                elif member[1].startswith("pg_"):
                    found.add("catalog")
            prev = token
            continue
        if nxt == ("o", "(") and not (prev[0] == "w" and prev[1] in _NOT_CALL_BEFORE):
            reason = _function_reason(value, _lex_bool_arg(tokens, i + 1) if value == "set_config" else None)
            if reason:
                found.add(reason)
        elif (
            value in CATALOG_RELATIONS
            and nxt != ("o", ".")
            and query_level[depth]
            and ((prev[0] == "w" and prev[1] in _RELATION_BEFORE) or (prev == ("o", ",") and clause[depth] == "from"))
        ):
            found.add("catalog")
        prev = token
    return _first(found)


def _lex_create(tokens: list[Token]) -> str:
    words = [value for kind, value in tokens[1:6] if kind == "w"]
    if words[:2] == ["or", "replace"]:
        words = words[2:]
    if words[:1] in (["local"], ["global"]):
        words = words[1:]
    return "temp_table" if words[:1] in (["temp"], ["temporary"]) else "ddl"


def _skip_explain(tokens: list[Token]) -> list[Token]:
    """The statement an ``EXPLAIN [(options)] [ANALYZE] [VERBOSE]`` prefix applies to."""
    while tokens and tokens[0] == ("w", "explain"):
        i = 1
        if len(tokens) > 1 and tokens[1] == ("o", "("):
            depth = 0
            for i, token in enumerate(tokens[1:], start=1):  # noqa: B007 - i is used after the loop
                depth += (token == ("o", "(")) - (token == ("o", ")"))
                if depth == 0:
                    break
            i += 1
        while i < len(tokens) and tokens[i] in (("w", "analyze"), ("w", "analyse"), ("w", "verbose")):
            i += 1
        tokens = tokens[i:]
    return tokens


def _lex_statement(tokens: list[Token]) -> str:  # noqa: PLR0911, PLR0912 - a dispatch on the statement's leading keywords, one rule per branch
    tokens = _skip_explain(tokens)
    if not tokens:
        return ""
    kind, head = tokens[0]
    if kind != "w":
        return _lex_dml(tokens) if head == "(" else ""
    second = tokens[1] if len(tokens) > 1 else ("o", "")
    third = tokens[2] if len(tokens) > 2 else ("o", "")
    if head in _DML_WORDS:
        return _lex_dml(tokens)
    if head == "create":
        return _lex_create(tokens)
    if head in _DDL_WORDS:
        return "ddl"
    if head == "set":
        if second[0] != "w":
            return "session_set"
        if second[1] in ("local", "transaction", "constraints"):
            return ""
        if second[1] == "role" or (second[1] == "session" and third in (("w", "role"), ("w", "authorization"))):
            return "set_role"
        return "session_set"
    if head == "reset":
        if second == ("w", "role") or (second == ("w", "session") and third == ("w", "authorization")):
            return "set_role"
        return "session_set"
    if head in ("discard", "load"):
        return "session_set"
    if head in ("listen", "unlisten"):
        return "listen"
    if head == "prepare":
        return "" if second == ("w", "transaction") and third[0] == "s" else "prepare"
    if head in ("execute", "deallocate"):
        return "prepare"
    if head == "declare":
        for i, token in enumerate(tokens):
            if token == ("w", "hold") and tokens[i - 1] == ("w", "with"):
                return "hold_cursor"
            if token == ("w", "for"):
                return _lex_dml(tokens[i + 1 :]) if i + 1 < len(tokens) else ""
        return ""
    if head == "copy":
        depth = 0
        for i, token in enumerate(tokens):
            if token == ("o", "("):
                depth += 1
            elif token == ("o", ")"):
                depth -= 1
            elif depth == 0 and token in (("w", "from"), ("w", "to")):
                target = tokens[i + 1] if i + 1 < len(tokens) else ("o", "")
                if target not in (("w", "stdin"), ("w", "stdout")):
                    return "copy"
                break
        return _lex_dml(tokens)
    return ""


def statements(sql: str) -> list[list[Token]]:
    """``sql`` split into statements of lexer tokens (``(kind, text)``; words are lower-cased, kind ``"w"``).

    For callers that refine a decision per statement (the sidecar's pinning) on the same reading of
    SQL as :func:`classify`.
    """
    return split_statements(tokenize(sql))


def statement_reason(tokens: list[Token]) -> str:
    """Why one statement from :func:`statements` needs the direct connection (a ``REASONS`` key, or ``""``)."""
    return _lex_statement(tokens)


def _classify_lexer(sql: str) -> Decision:
    """Classify with the hand-written lexer (no fast path, no cache)."""
    for statement in split_statements(tokenize(sql)):
        reason = _lex_statement(statement)
        if reason:
            return _DECISIONS[reason]
    return POOLED


# --------------------------------------------------------------------------------------------

_CACHE_MAX_TEXT = 16_384  # longer statements (bulk literals) are classified but not kept


@functools.lru_cache(maxsize=4096)
def _classify_cached(sql: str) -> Decision:
    return _classify_uncached(sql)


def _classify_uncached(sql: str) -> Decision:
    if _fast_pooled(sql):
        return POOLED
    return _classify_lexer(sql)


def classify(sql: str) -> Decision:
    """Decide whether ``sql`` (one or more statements) needs the direct connection, and why.

    Returns :data:`POOLED` for statements a transaction pooler carries, otherwise a direct
    :class:`Decision` whose ``reason`` is one of :data:`REASONS`. Pure and never raises for a
    ``str``; results are cached by statement text (bounded LRU, statements up to 16 KiB).
    """
    if len(sql) > _CACHE_MAX_TEXT:
        return _classify_uncached(sql)
    return _classify_cached(sql)
