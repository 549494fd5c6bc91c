"""poolkit.routing: DML never goes direct by accident; session features, DDL and catalog reads do.

Three layers: the corpus of real ORM/migration/driver SQL (tests/corpus/*.sql), property-based
tests over generated statements, and pglast (PostgreSQL's own parser) as an independent reference
that every generated statement must also parse with and agree with.
"""

from __future__ import annotations

import dataclasses

import pglast.keywords
import pytest
from corpus import Case, load_corpus
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.pglast_reference import classify_pglast

from poolkit.sql import routing
from poolkit.sql.routing import (
    CATALOG_RELATIONS,
    INTROSPECTION_FUNCTIONS,
    POOLED,
    REASONS,
    Decision,
    Route,
    classify,
)

CASES = load_corpus()


# ---------------------------------------------------------------------------------------------
# API shape


def test_reasons_are_the_fixed_metric_label_set() -> None:
    assert {
        "ddl",
        "catalog",
        "session_set",
        "set_role",
        "advisory_lock",
        "listen",
        "prepare",
        "hold_cursor",
        "temp_table",
        "copy",
    } == REASONS
    assert all(r.isidentifier() and r == r.lower() for r in REASONS)


def test_decision_is_frozen_and_route_is_a_str_enum() -> None:
    decision = classify("LISTEN jobs")
    assert decision == Decision(Route.DIRECT, "listen")
    assert decision.direct
    assert decision.route == "direct"
    assert Decision(Route.POOLED, "") == POOLED and not POOLED.direct
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.reason = "ddl"  # type: ignore[misc]


def test_results_are_cached_by_statement_text() -> None:
    routing._classify_cached.cache_clear()
    sql = "SELECT * FROM pg_catalog.pg_class WHERE relname = $1"
    first = classify(sql)
    info = routing._classify_cached.cache_info()
    assert classify(sql) is first
    assert routing._classify_cached.cache_info().hits == info.hits + 1
    assert routing._classify_cached.cache_info().maxsize == 4096


def test_huge_statements_are_classified_but_not_cached() -> None:
    routing._classify_cached.cache_clear()
    sql = "INSERT INTO t (a) VALUES " + ", ".join(f"({i})" for i in range(5000))
    assert classify(sql) == POOLED
    assert routing._classify_cached.cache_info().currsize == 0


@pytest.mark.parametrize(
    "sql", ["", "   ", ";", "-- only a comment", "/* unterminated", "'unterminated", "\\d users", "\x00\x01", "("]
)
def test_odd_input_never_raises_and_stays_pooled(sql: str) -> None:
    assert classify(sql) == POOLED


def test_deeply_nested_input_never_raises() -> None:
    assert classify("EXPLAIN " * 5000 + "DROP TABLE t") == Decision(Route.DIRECT, "ddl")
    assert classify("(" * 20_000 + "SELECT 1") == POOLED
    assert classify("SELECT " + "/* " * 10_000 + "x") == POOLED


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_any_text_never_raises(sql: str) -> None:
    decision = routing._classify_uncached(sql)
    assert decision.route in (Route.POOLED, Route.DIRECT)
    assert decision.reason in REASONS or decision == POOLED


# ---------------------------------------------------------------------------------------------
# Corpus of real SQL


def test_corpus_covers_every_reason_and_every_source() -> None:
    assert {c.reason for c in CASES if c.route == "direct"} == REASONS
    sources = {c.source for c in CASES}
    for name in ("sqlalchemy_alembic", "django", "prisma", "rails", "psql_pg_dump", "supabase", "app_dml"):
        assert f"{name}.sql" in sources
    assert sum(c.route == "pooled" for c in CASES) >= 100


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_statement_routes_as_expected(case: Case) -> None:
    decision = classify(case.sql)
    assert (decision.route.value, decision.reason) == (case.route, case.reason), case.note


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_pglast_reference_agrees_on_corpus(case: Case) -> None:
    reference = classify_pglast(case.sql)
    assert reference is not None, "corpus SQL must be valid PostgreSQL"
    assert reference == routing._classify_lexer(case.sql)


# ---------------------------------------------------------------------------------------------
# The prefilter is only an optimisation: it may say "pooled" only when the lexer would.


def test_prefilter_triggers_cover_every_name_a_dml_reason_needs() -> None:
    names = CATALOG_RELATIONS | INTROSPECTION_FUNCTIONS | routing._ADVISORY_SESSION | {"set_config"}
    names |= {"pg_catalog", "information_schema", "pg_temp", "pg_get_anything", "pg_x_is_visible"}
    for name in names:
        assert any(t in name for t in routing._DML_TRIGGERS), name


def test_prefilter_sends_suspicious_statements_to_the_lexer() -> None:
    assert routing._fast_pooled("SELECT id FROM users WHERE id = $1")
    assert routing._fast_pooled("INSERT INTO t (a) VALUES (1)")
    for sql in (
        "SELECT relname FROM PG_CLASS",
        "SELECT 1; SET x = 1",
        "SELECT a INTO b FROM c",
        "SELECT set_config('a', 'b', false)",
        "SELECT obj_description(1)",
        "SET x = 1",
        "  -- c\nSELECT 1",
    ):
        assert not routing._fast_pooled(sql), sql


# ---------------------------------------------------------------------------------------------
# Generated statements


_KEYWORDS = (
    pglast.keywords.RESERVED_KEYWORDS | pglast.keywords.TYPE_FUNC_NAME_KEYWORDS | pglast.keywords.COL_NAME_KEYWORDS
)
# Names that have tripped (or would trip) a careless classifier: statement keywords, pg_ prefixes,
# catalog names (only ever used where they are not relations).
_NASTY = [
    "set",
    "listen",
    "unlisten",
    "prepare",
    "copy",
    "declare",
    "temp",
    "temporary",
    "hold",
    "reset",
    "discard",
    "execute",
    "role",
    "session",
    "create_at",
    "drop_at",
    "grant_id",
    "pg_notes",
    "pg_notes_tags",
    "pg_classy",
    "pg_temp_data",
    "information",
    "schema",
    "catalog",
    "Users",
]
_plain_name = st.from_regex(r"[a-z_][a-z0-9_$]{0,12}", fullmatch=True).filter(
    lambda s: s not in _KEYWORDS and s not in CATALOG_RELATIONS and not s.startswith("pg_temp")
)
_quoted_name = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=12,
).map(lambda s: '"' + s.replace('"', '""') + '"')
_table = st.one_of(
    st.sampled_from(_NASTY),
    _plain_name,
    _quoted_name.filter(lambda q: q[1:-1] not in CATALOG_RELATIONS),
    st.tuples(st.sampled_from(["public", "myapp", '"My Schema"']), st.sampled_from([*_NASTY, "pg_class"])).map(
        ".".join
    ),
)
# A column may be named anything, catalog names included.
_column = st.one_of(
    st.sampled_from([*_NASTY, "pg_class", "pg_namespace", "pg_index", "information_schema", "pg_catalog"]),
    _plain_name,
    _quoted_name,
)
_ddl_words = st.sampled_from(
    [
        "DROP TABLE users;",
        "CREATE TABLE x ()",
        "SET ROLE admin",
        "LISTEN x",
        "pg_catalog.pg_class",
        "'; TRUNCATE",
        "$$",
        "*/",
        "--",
        "SELECT pg_advisory_lock(1)",
        "\\'",
        "INTO TEMP t",
    ]
)
# (no NUL: PostgreSQL's parser, the reference here, reads C strings)
_content = st.lists(
    st.one_of(_ddl_words, st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=5)),
    max_size=3,
).map(" ".join)


def _std(text: str) -> str:
    return "'" + text.replace("\x00", "").replace("'", "''") + "'"


def _escaped(text: str) -> str:
    return "E'" + text.replace("\x00", "").replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dollar(text: str) -> str:
    text = text.replace("\x00", "")
    tag = "q"
    while f"${tag}" in text:
        tag += "q"
    return f"${tag}${text}${tag}$"


_value = st.one_of(
    _content.map(_std),
    _content.map(_escaped),
    _content.map(_dollar),
    st.integers(min_value=0, max_value=10**9).map(str),
    st.sampled_from(["$1", "$2", "%s", "%(name)s", "TRUE", "NULL", "now()", "CURRENT_TIMESTAMP"]),
    st.sampled_from(
        [
            "pg_advisory_xact_lock(42)",
            "pg_try_advisory_xact_lock(hashtext($1))",
            "set_config('app.user', $1, true)",
            "set_config('request.jwt.claims', 'x', 'on'::boolean)",
            "current_setting('app.user', true)",
            "pg_notify('ch', 'DROP TABLE x')",
            "'users'::regclass",
            "$1::pg_catalog.int4",
            "$1::pg_catalog.pg_lsn",
            "CAST($1 AS pg_catalog.text)",
            "nextval('pg_notes_id_seq')",
            "lower($1)",
        ]
    ),
)
_comment = st.one_of(
    _content.map(lambda t: "/* " + t.replace("*/", "").replace("/*", "") + " */"),
    _content.map(lambda t: "-- " + t.replace("\n", " ").replace("\r", " ") + "\n"),
)
_gap = st.one_of(st.sampled_from([" ", "  ", "\n", "\t", " \n "]), _comment.map(lambda c: f" {c} "))


@st.composite
def _case(draw: st.DrawFn, keyword: str) -> str:
    return "".join(ch.upper() if draw(st.booleans()) else ch.lower() for ch in keyword)


@st.composite
def _dml(draw: st.DrawFn) -> str:  # noqa: PLR0912 - the generator's grammar: one branch per statement kind, each with its optional clauses
    """One DML statement as a list of tokens joined by random whitespace and comments."""
    kw = lambda word: draw(_case(word))  # noqa: E731
    table = draw(_table)
    cols = draw(st.lists(_column, min_size=1, max_size=3))
    col = cols[0]
    value = lambda: draw(_value)  # noqa: E731
    kind = draw(st.sampled_from(["select", "insert", "update", "delete", "with", "merge"]))
    if kind == "select":
        parts = [kw("select"), ", ".join(cols), kw("from"), table]
        if draw(st.booleans()):
            parts += [kw("as"), "t1", kw("join"), draw(_table), kw("as"), "t2", kw("on"), "t1.id = t2.id"]
        parts += [kw("where"), col, "=", value()]
        if draw(st.booleans()):
            parts += [kw("and"), col, kw("in"), f"({value()}, {value()})"]
        if draw(st.booleans()):
            parts += [kw("order by"), col, kw("limit"), "10"]
        if draw(st.booleans()):
            parts += [kw("for update"), kw("skip locked")]
    elif kind == "insert":
        parts = [kw("insert into"), table, "(" + ", ".join(cols) + ")", kw("values")]
        parts += ["(" + ", ".join(value() for _ in cols) + ")"]
        if draw(st.booleans()):
            parts += [kw("on conflict"), f"({col})", kw("do update set"), col, "=", kw("excluded") + "." + col]
        if draw(st.booleans()):
            parts += [kw("returning"), ", ".join(cols)]
    elif kind == "update":
        parts = [kw("update"), table, kw("set"), col, "=", value(), kw("where"), cols[-1], "=", value()]
        if draw(st.booleans()):
            parts += [kw("returning"), "*"]
    elif kind == "delete":
        parts = [kw("delete from"), table, kw("where"), col, "<>", value()]
        if draw(st.booleans()):
            parts += [kw("returning"), col]
    elif kind == "with":
        parts = [kw("with"), "cte", kw("as"), "(", kw("select"), col, kw("from"), table, ")"]
        parts += [kw("select"), "*", kw("from"), "cte", kw("where"), "cte." + col, "=", value()]
    else:
        parts = [kw("merge into"), table, kw("as"), "t", kw("using"), draw(_table), kw("as"), "s"]
        parts += [kw("on"), "t.id = s.id", kw("when matched then update set"), col, "=", value()]
    out = draw(st.sampled_from(["", " ", "\n", "/* lead */ "]))
    for part in parts:
        out += part + draw(_gap)
    return out + draw(st.sampled_from(["", ";", " ;\n"]))


def _pglast_reference(sql: str) -> Decision:
    reference = classify_pglast(sql)
    assert reference is not None, f"generator produced SQL PostgreSQL cannot parse: {sql!r}"
    return reference


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sql=_dml())
def test_generated_dml_is_always_pooled(sql: str) -> None:
    assert _pglast_reference(sql) == POOLED  # the generator only makes valid, pooled DML
    assert routing._classify_lexer(sql) == POOLED
    assert routing._classify_uncached(sql) == POOLED
    assert classify(sql) == POOLED


_direct_name = st.one_of(st.sampled_from(["app_x", "jobs", "c1", "search_path", "Users"]), _plain_name)
_setting = _plain_name.filter(
    lambda s: (
        s not in {"role", "session", "local", "transaction", "constraints", "time", "names", "schema", "xml"}
        and s not in pglast.keywords.UNRESERVED_KEYWORDS
    )
)


@st.composite
def _direct(draw: st.DrawFn) -> tuple[str, str]:
    """A statement that needs the direct connection and its reason."""
    kw = lambda word: draw(_case(word))  # noqa: E731
    name = draw(_direct_name.filter(lambda s: s not in pglast.keywords.UNRESERVED_KEYWORDS))
    table = draw(_table)
    reason = draw(st.sampled_from(sorted(REASONS)))
    literal = draw(_content.map(_std))
    dml = draw(_dml()).strip().rstrip(";")
    if reason == "session_set":
        is_local = draw(st.sampled_from(["false", "FALSE", "'off'", "'f'::bool", "$2"]))
        options = [
            f"{kw('set')} {draw(_setting)} {draw(st.sampled_from(['TO', '=']))} {literal}",
            f"{kw('set session')} {draw(_setting)} {kw('to')} {literal}",
            f"{kw('reset')} {draw(_setting)}",
            f"{kw('reset all')}",
            f"{kw('select')} {draw(st.sampled_from(['', 'pg_catalog.']))}set_config({literal}, $1, {is_local})",
        ]
    elif reason == "set_role":
        options = [
            f"{kw('set role')} {name}",
            f"{kw('set session role')} {name}",
            f"{kw('set session authorization')} {name}",
            kw("reset role"),
        ]
    elif reason == "advisory_lock":
        fn = draw(st.sampled_from(sorted(routing._ADVISORY_SESSION - {"pg_advisory_unlock_all"})))
        options = [f"{kw('select')} {draw(st.sampled_from(['', 'pg_catalog.']))}{fn}({draw(st.integers(0, 2**40))})"]
    elif reason == "listen":
        options = [f"{kw('listen')} {name}", f"{kw('unlisten')} {name}", f"{kw('unlisten')} *"]
    elif reason == "prepare":
        options = [f"{kw('prepare')} {name} {kw('as')} {dml}", f"{kw('execute')} {name}", f"{kw('deallocate')} {name}"]
    elif reason == "hold_cursor":
        options = [f"{kw('declare')} {name} {kw('no scroll cursor with hold for')} {kw('select')} 1"]
    elif reason == "temp_table":
        temp = draw(st.sampled_from(["temp", "temporary", "local temp", "global temporary"]))
        options = [
            f"{kw('create')} {kw(temp)} {kw('table')} {name} (a int)",
            f"{kw('select')} * {kw('into')} {kw(temp)} {name} {kw('from')} {table}",
        ]
    elif reason == "copy":
        # (never an empty file name: pglast's JSON cannot tell COPY FROM '' from COPY FROM STDIN)
        path = _std("/srv/" + draw(_content))
        options = [f"{kw('copy')} {table} {kw('from')} {path}", f"{kw('copy')} {table} {kw('to program')} {path}"]
    elif reason == "ddl":
        options = [
            f"{kw('create table')} {name} (a int)",
            f"{kw('alter table')} {table} {kw('add column')} {name} int",
            f"{kw('drop table')} {table}",
            f"{kw('create index on')} {table} (a)",
            f"{kw('comment on table')} {table} {kw('is')} {literal}",
            f"{kw('grant select on')} {table} {kw('to')} {name}",
            f"{kw('select')} * {kw('into')} {name} {kw('from')} {table}",
            f"{kw('vacuum')} {table}",
        ]
    else:  # catalog
        catalog = draw(st.sampled_from(sorted(CATALOG_RELATIONS)))
        options = [
            f"{kw('select')} * {kw('from')} pg_catalog.{catalog}",
            f"{kw('select')} c.oid {kw('from')} {catalog} c {kw('where')} c.oid = $1",
            f"{kw('select')} * {kw('from')} {table} t, {catalog} c",
            f"{kw('select')} * {kw('from')} information_schema.{name}",
            f"{kw('select')} format_type($1, $2)",
            f"{kw('select')} pg_catalog.pg_get_indexdef($1)",
        ]
    statement = draw(st.sampled_from(options))
    lead = draw(st.sampled_from(["", "\n  ", "/* SELECT 1 */ ", "-- note\n"]))
    return lead + statement, reason


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_direct())
@example(case=("select * from public.set t, pg_aggregate c", "catalog"))  # `set` after a dot ended the FROM list
def test_generated_direct_statements_get_their_reason(case: tuple[str, str]) -> None:
    sql, reason = case
    expected = Decision(Route.DIRECT, reason)
    assert _pglast_reference(sql) == expected
    assert classify(sql) == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(_dml(), max_size=2), case=_direct(), after=st.lists(_dml(), max_size=2))
def test_one_direct_statement_sends_the_whole_string_direct(
    before: list[str], case: tuple[str, str], after: list[str]
) -> None:
    sql = "\n;\n".join([*(s.strip().rstrip(";") for s in before), case[0], *(s.strip().rstrip(";") for s in after)])
    assert classify(sql) == Decision(Route.DIRECT, case[1])
    assert _pglast_reference(sql) == Decision(Route.DIRECT, case[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sql=st.one_of(_dml(), _direct().map(lambda c: c[0])))
def test_prefilter_never_contradicts_the_lexer(sql: str) -> None:
    if routing._fast_pooled(sql):
        assert routing._classify_lexer(sql) == POOLED
