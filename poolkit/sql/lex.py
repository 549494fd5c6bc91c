"""SQL lexing, pure: where PostgreSQL's strings, quoted names, dollar quotes and comments end, and tokens.

One reading of SQL text for poolkit: the router (``poolkit.sql.routing``, and the sidecar through it) takes
:func:`tokenize`'s tokens; the log normaliser (``poolkit.sql.normalize``) copies text between the places it edits
and uses the same scanners for the bodies of quoted tokens. Hand-written because the routing rules need only
tokens and a little structure, it is faster than parsing, and it accepts text PostgreSQL's parser would reject
but the driver rewrites (psycopg's ``%s``, SQLAlchemy's ``:name``) as well as cut-off statements.

Unterminated strings, identifiers and comments run to the end of the text, as PostgreSQL would read them.
"""

from __future__ import annotations

import re

__all__ = [
    "E_STRING_END",
    "QIDENT_END",
    "STD_STRING_END",
    "Token",
    "dollar_body_end",
    "quoted_body",
    "quoted_end",
    "skip_block_comment",
    "split_statements",
    "tokenize",
]

# Unrolled loops (`[^']*(?:''[^']*)*`): no backtracking, and long literals scan at C speed. Each matches a
# body from just after its opening quote up to and including the closing one.
STD_STRING_END = re.compile(r"[^']*(?:''[^']*)*'")
E_STRING_END = re.compile(r"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", re.DOTALL)
QIDENT_END = re.compile(r'[^"]*(?:""[^"]*)*"')
_BLOCK_TOKEN = re.compile(r"/\*|\*/")

_TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<line>--[^\n]*)
    | (?P<block>/\*)
    | (?P<qident>")
    | (?P<estr>[eE]')
    | (?P<str>(?:[uU]&|[bBxXnN])?')
    | (?P<param>\$\d+|%\(\w+\)s|%s|%%)
    | (?P<dollar>\$(?:[^\W\d]\w*)?\$)
    | (?P<word>[^\W\d][\w$]*)
    | (?P<num>(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?\w*)
    | (?P<cast>::)
    | (?P<op>(?:(?!--|/\*)[-+*/<>=~!@\#%^&|`?])+|.)
    """,
    re.VERBOSE | re.DOTALL,
)

#: A token: (kind, text). Kinds: "w" word (lower-cased), "q" quoted identifier, "s" string (its text),
#: "n" number, "p" placeholder, "o" operator or punctuation.
Token = tuple[str, str]


def skip_block_comment(sql: str, pos: int) -> int:
    """The index just past the (nested: PostgreSQL's nest) block comment whose body starts at ``pos``."""
    depth = 1
    while depth:
        m = _BLOCK_TOKEN.search(sql, pos)
        if m is None:
            return len(sql)  # unterminated: the comment runs to the end
        depth += 1 if m.group() == "/*" else -1
        pos = m.end()
    return pos


def quoted_end(pattern: re.Pattern[str], sql: str, pos: int) -> int | None:
    """The index just past the closing quote of the body starting at ``pos`` (``*_END``); None if unterminated."""
    m = pattern.match(sql, pos)
    return None if m is None else m.end()


def quoted_body(pattern: re.Pattern[str], sql: str, pos: int) -> tuple[str, int]:
    """Body (escapes as written) and end of a quoted token whose body starts at ``pos`` (unterminated: to the end)."""
    end = quoted_end(pattern, sql, pos)
    if end is None:
        return sql[pos:], len(sql)
    return sql[pos : end - 1], end


def dollar_body_end(sql: str, tag: str, pos: int) -> tuple[int, int]:
    """(end of the body, end of the closing ``tag``) of the dollar-quoted string whose body starts at ``pos``."""
    close = sql.find(tag, pos)
    if close < 0:
        return len(sql), len(sql)
    return close, close + len(tag)


def tokenize(sql: str) -> list[Token]:
    """``sql`` as tokens; whitespace and comments are dropped."""
    tokens: list[Token] = []
    append = tokens.append
    match = _TOKEN.match
    pos = 0
    n = len(sql)
    while pos < n:
        m = match(sql, pos)
        if m is None:  # pragma: no cover - the last alternative matches any character
            break
        kind = m.lastgroup
        pos = m.end()
        if kind == "word":
            append(("w", m.group().lower()))
        elif kind in ("ws", "line"):
            continue
        elif kind in ("op", "cast"):
            append(("o", m.group()))
        elif kind == "qident":
            body, pos = quoted_body(QIDENT_END, sql, pos)
            append(("q", body.replace('""', '"')))
        elif kind == "str":
            body, pos = quoted_body(STD_STRING_END, sql, pos)
            append(("s", body.replace("''", "'")))
        elif kind == "estr":
            body, pos = quoted_body(E_STRING_END, sql, pos)
            append(("s", body))
        elif kind == "dollar":
            end, pos = dollar_body_end(sql, m.group(), pos)
            append(("s", sql[m.end() : end]))
        elif kind == "block":
            pos = skip_block_comment(sql, pos)
        elif kind == "param":
            append(("p", m.group()))
        else:
            append(("n", m.group()))
    return tokens


def split_statements(tokens: list[Token]) -> list[list[Token]]:
    """``tokens`` split at top-level ``;`` into statements (empty statements dropped)."""
    statements: list[list[Token]] = []
    current: list[Token] = []
    for token in tokens:
        if token == ("o", ";"):
            if current:
                statements.append(current)
            current = []
        else:
            current.append(token)
    if current:
        statements.append(current)
    return statements
