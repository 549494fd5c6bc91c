"""poolkit.sql.normalize: literals, numbers and comments never reach the output; arbitrary text never raises."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from poolkit.sql.normalize import TRUNCATION_MARKER, normalize

# ---------------------------------------------------------------------------------------------
# Examples: what the normalised text looks like.


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM users WHERE email = 'a@b.c' AND id = 42", "SELECT * FROM users WHERE email = ? AND id = ?"),
        ("select  *\n\tfrom t1   where x=1.5e10", "select * from t1 where x=?"),
        ("SELECT 'it''s', E'a\\'b', U&'d\\0061t', B'0101', X'ff', N'n'", "SELECT ?, ?, ?, ?, ?, ?"),
        ("SELECT $$a 'b' c$$, $fn$ x $$ y $fn$", "SELECT ?, ?"),
        ("SELECT 0xFF, 0o17, 0b101, 1_000_000, .5, 3.", "SELECT ?, ?, ?, ?, ?, ?"),
        ("SELECT * FROM t WHERE id IN (1, 2, 3)", "SELECT * FROM t WHERE id IN (...)"),
        ("SELECT * FROM t WHERE id in ($1,$2,$3) OR x IN (%s, %s)", "SELECT * FROM t WHERE id in (...) OR x IN (...)"),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM u)", "SELECT * FROM t WHERE id IN (SELECT id FROM u)"),
        ("SELECT * FROM t WHERE tags && ARRAY['a', 'b']", "SELECT * FROM t WHERE tags && ARRAY[...]"),
        ("INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, 'z')", "INSERT INTO t (a, b) VALUES (?, ?), ..."),
        ("INSERT INTO t VALUES ($1, $2), ($3, $4)", "INSERT INTO t VALUES ($1, $2), ($3, $4)"),
        ("SELECT * FROM t WHERE a = $1 AND b = %s AND c = %(name)s AND d = :e", None),
        ("SELECT 1 -- password is hunter2\n, 2", "SELECT ? , ?"),
        ("SELECT /* outer /* nested 'x' */ still comment */ a", "SELECT a"),
        ('SELECT "Weird ""Name"" 42", t1.c2 FROM t1', 'SELECT "Weird ""Name"" 42", t1.c2 FROM t1'),
        ("SELECT TRUE, FALSE, NULL", "SELECT TRUE, FALSE, NULL"),
        ("SELECT a-1, b[2], c::numeric(10,2)", "SELECT a-?, b[?], c::numeric(?,?)"),
        # Unterminated constructs run to the end, as PostgreSQL would read them.
        ("SELECT 'unterminated secret", "SELECT ?"),
        ("SELECT E'esc \\' secret", "SELECT ?"),
        ("SELECT $tag$ secret", "SELECT ?"),
        ("SELECT 1 /* secret", "SELECT ?"),
        ('SELECT "unterminated secret = 1', 'SELECT "?'),
        ("", ""),
        ("   \n ", ""),
    ],
)
def test_normalize_examples(sql: str, expected: str | None) -> None:
    assert normalize(sql) == (sql if expected is None else expected)


def test_identifiers_with_digits_and_dollars_are_kept() -> None:
    assert normalize("SELECT col_2, t1.x$y FROM s3.t1") == "SELECT col_2, t1.x$y FROM s3.t1"


def test_string_directly_after_a_word_is_still_a_literal() -> None:
    # `name'x'` is the word `name` and the string 'x' for PostgreSQL's lexer too.
    assert normalize("SELECT name'secret'") == "SELECT name?"


def test_length_is_capped_with_marker() -> None:
    sql = "SELECT " + ", ".join(f"column_{i}" for i in range(500)) + " FROM t"
    out = normalize(sql, max_length=100)
    assert len(out) <= 100
    assert out.endswith(TRUNCATION_MARKER)
    assert out.startswith("SELECT column_0, column_1")
    assert normalize(sql, max_length=len(normalize(sql))) == normalize(sql)  # exactly at the cap: not cut


def test_tiny_caps_never_exceed_the_limit() -> None:
    for cap in range(len(TRUNCATION_MARKER) + 3):
        assert len(normalize("SELECT a_long_identifier FROM t", max_length=cap)) <= cap


# ---------------------------------------------------------------------------------------------
# Properties.


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(sql=st.text(), max_length=st.integers(min_value=0, max_value=300))
@example(sql="0:0:0:0:0:0A0000", max_length=len(TRUNCATION_MARKER))  # found by CI: marker alone, no SQL left
def test_any_text_never_raises_and_respects_the_cap(sql: str, max_length: int) -> None:
    out = normalize(sql, max_length=max_length)
    assert isinstance(out, str)
    assert len(out) <= max_length
    assert out == out.strip()
    assert "\n" not in out
    assert "\t" not in out


@settings(max_examples=300)
@given(sql=st.text(alphabet=st.sampled_from(list("'\"$eE/*-\n xa1.\\(),;IN?%s")), max_size=60))
def test_normalize_is_idempotent(sql: str) -> None:
    # Dense in the characters that start and end tokens, so quoting edge cases are explored.
    once = normalize(sql)
    assert normalize(once) == once


# A statement is built from "code" (keywords, identifiers, operators, placeholders: never a digit
# outside a placeholder and never SECRET) and "data" (literals and comments, every one of which
# carries SECRET and digits). The property: after normalisation no SECRET and, placeholders
# aside, no digit remains.
SECRET = "§"
_data_text = st.text(
    # Dense in quote, escape and comment characters, so literals that contain them are common.
    # (arbitrary Unicode is the job of test_any_text_never_raises_and_respects_the_cap).
    alphabet="'\"\\$*/-\n;eEqx 0é€",
    max_size=12,
).map(lambda s: f"{s[: len(s) // 2]}{SECRET}7{s[len(s) // 2 :]}")


def _std_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _e_string(text: str) -> str:
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dollar_string(text: str) -> str:
    tag = "q"
    while f"${tag}$" in text or text.endswith(f"${tag}") or text.endswith("$"):
        tag += "q"
        if text.endswith("$"):
            text += " "
    return f"${tag}${text}${tag}$"


def _line_comment(text: str) -> str:
    return "-- " + text.replace("\n", " ").replace("\r", " ") + "\n"


def _block_comment(text: str) -> str:
    return "/* " + text.replace("*/", "* /").replace("/*", "/ *") + " */"


_numbers = st.one_of(
    st.integers(min_value=0, max_value=10**12).map(str),
    st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False).map(repr),
    st.integers(min_value=1, max_value=10**6).map(lambda i: f"{i}.{i % 97}e{i % 7}"),
    st.integers(min_value=0, max_value=2**32).map(hex),
    st.integers(min_value=1000, max_value=10**9).map(lambda i: f"{i:_}"),
    st.integers(min_value=0, max_value=10**6).map(lambda i: f".{i}"),
)
_data = st.one_of(
    _data_text.map(_std_string),
    _data_text.map(_e_string),
    _data_text.map(_dollar_string),
    _data_text.map(lambda t: "U&" + _std_string(t)),
    _data_text.map(_line_comment),
    _data_text.map(_block_comment),
    _numbers,
)
_words = st.sampled_from(
    [
        "SELECT",
        "select",
        "FROM",
        "WHERE",
        "AND",
        "IN",
        "VALUES",
        "INSERT INTO",
        "users",
        "pg_class",
        "name",
        "e",
        "E",
        "x",
        "U",
        "tbl",
        '"Quoted Ident"',
        '"it""s"',
        "$1",
        "$23",
        "%s",
        "%(name)s",
        ":name",
        "=",
        "<>",
        "(",
        ")",
        ",",
        ";",
        "::",
        "||",
        "-",
        "+",
        "*",
        ".",
        "[",
        "]",
    ]
)
_separators = st.sampled_from([" ", "\n", "\t ", "  "])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.tuples(st.one_of(_words, _data), _separators), max_size=25))
def test_no_literal_content_or_number_survives(parts: list[tuple[str, str]]) -> None:
    sql = "".join(piece + sep for piece, sep in parts)
    out = normalize(sql, max_length=100_000)
    assert SECRET not in out
    assert not re.search(r"\d", re.sub(r"\$\d+", "", out)), out


def test_a_data_only_statement_collapses_to_placeholders() -> None:
    assert normalize("SELECT 'a', 1, $$b$$ -- c") == "SELECT ?, ?, ?"
