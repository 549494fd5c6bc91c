"""SQL normalisation for logs: literals and comments removed, lists collapsed, length capped."""

from __future__ import annotations

import re

__all__ = ["TRUNCATION_MARKER", "normalize"]

#: Appended to a normalised statement that was cut at ``max_length``.
TRUNCATION_MARKER = " ...(truncated)"

# Hand-written rather than pglast.parser.normalize(): this must never raise (pglast rejects
# anything that is not valid SQL, including psycopg's %s placeholders and cut-off statements),
# must keep placeholders as written, and runs where pglast (an optional extra) may be absent.
#
# One search regex finds the next token that needs attention; everything between two such
# tokens (keywords, identifiers, operators, placeholders) is copied unchanged. The lookbehinds
# stop a match from starting inside an identifier (`t1`, `name'x'` is `name` then a string,
# `a$1`), which is what PostgreSQL's lexer does too.
_NEXT = re.compile(
    r"""
      (?P<line>--)                                     # comment to end of line
    | (?P<block>/\*)                                   # block comment, nests in PostgreSQL
    | (?P<qident>")                                    # quoted identifier: a name, kept
    | (?<![\w$])(?P<estr>[eE]')                        # E'' string: backslash escapes
    | (?P<pstr>(?:(?<![\w$])(?:[uU]&|[bBxXnN]))?')     # '', U&'', B'', X'', N'' strings
    | (?<![^\W\d]|\$)(?P<dollar>\$(?:[^\W\d]\w*)?\$)  # $tag$ … $tag$ ($1 is a placeholder)
    | (?<![\w$])(?P<num>
          0[xX][0-9a-fA-F_]* | 0[oO][0-7_]* | 0[bB][01_]*
        | (?:\d[\d_]*(?:\.(?!\.)[\d_]*)? | \.\d[\d_]*)(?:[eE][+-]?\d+)?
      )
    """,
    re.VERBOSE,
)
# Unrolled loops (`[^']*(?:''[^']*)*`): no backtracking, and long literals scan at C speed.
_STD_STRING_END = re.compile(r"[^']*(?:''[^']*)*'")
_E_STRING_END = re.compile(r"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", re.DOTALL)
_QIDENT_END = re.compile(r'[^"]*(?:""[^"]*)*"')
_BLOCK_TOKEN = re.compile(r"/\*|\*/")

_ITEM = r"(?:\?|\$\d+|%s|%\(\w+\)s|:\w+|-\s?\?|\.\.\.)"
# `IN (?, ?, ?)` -> `IN (...)`: the number of values is data too (and splits one query shape in many).
_IN_LIST = re.compile(rf"\b(IN|in|In|iN)\s?\(\s?{_ITEM}(?:\s?,\s?{_ITEM})*\s?\)")
_ARRAY_LIST = re.compile(rf"\b(ARRAY|array|Array)\s?\[\s?{_ITEM}(?:\s?,\s?{_ITEM})*\s?\]")
# `VALUES (?, ?), (?, ?), ...` -> `VALUES (?, ?), ...` (rows identical after normalisation).
_VALUES_ROWS = re.compile(r"\b((?:VALUES|values|Values)\s?(\([^()]*\)))(?:\s?,\s?\2)+")


def _skip_block_comment(sql: str, pos: int) -> int:
    """Return the index just past the (nested) block comment whose body starts at ``pos``."""
    depth = 1
    while depth:
        m = _BLOCK_TOKEN.search(sql, pos)
        if m is None:
            return len(sql)  # unterminated: the comment runs to the end
        depth += 1 if m.group() == "/*" else -1
        pos = m.end()
    return pos


def _end_of(pattern: re.Pattern[str], sql: str, pos: int) -> int:
    m = pattern.match(sql, pos)
    return len(sql) if m is None else m.end()  # unterminated: runs to the end


def normalize(sql: str, *, max_length: int = 1024) -> str:
    """Return ``sql`` with every piece of data removed, for logs and events.

    String literals (``'…'``, ``E'…'``, ``U&'…'``, ``B'…'``, ``X'…'``, dollar-quoted) and numbers
    become ``?``; ``IN (…)`` and ``ARRAY[…]`` lists of values collapse to ``(...)`` / ``[...]``;
    repeated identical ``VALUES`` rows collapse to one row and ``...``; comments are removed
    (they can carry data); whitespace collapses to single spaces. Placeholders (``$1``, ``%s``,
    ``%(name)s``, ``:name``), keywords (``TRUE``, ``NULL``) and identifiers are kept.
    The result is at most ``max_length`` characters; a cut result ends with
    :data:`TRUNCATION_MARKER`. Never raises for any ``str``: unterminated quotes and
    comments run to the end of the text, as PostgreSQL would read them (an unterminated quoted
    identifier becomes ``"?``: the text after it may be data).
    """
    out: list[str] = []
    pos = 0
    n = len(sql)
    while pos < n:
        m = _NEXT.search(sql, pos)
        if m is None:
            out.append(sql[pos:])
            break
        out.append(sql[pos : m.start()])
        kind = m.lastgroup
        end = m.end()
        if kind == "line":
            nl = sql.find("\n", end)
            pos = n if nl < 0 else nl + 1
            out.append(" ")
        elif kind == "block":
            pos = _skip_block_comment(sql, end)
            out.append(" ")
        elif kind == "qident":
            q = _QIDENT_END.match(sql, end)
            if q is None:  # unterminated: PostgreSQL would reject it, and the rest may be data
                pos = n
                out.append('"?')
            else:
                pos = q.end()
                out.append(sql[m.start() : pos])
        elif kind == "estr":
            pos = _end_of(_E_STRING_END, sql, end)
            out.append("?")
        elif kind == "pstr":
            pos = _end_of(_STD_STRING_END, sql, end)
            out.append("?")
        elif kind == "dollar":
            close = sql.find(m.group(), end)
            pos = n if close < 0 else close + len(m.group())
            out.append("?")
        else:  # num
            pos = end
            out.append("?")
    text = " ".join("".join(out).split())
    if "?" in text or "$" in text or "%" in text or ":" in text:
        text = _IN_LIST.sub(r"\1 (...)", text)
        text = _ARRAY_LIST.sub(r"\1[...]", text)
        text = _VALUES_ROWS.sub(r"\1, ...", text)
    if len(text) > max_length:
        keep = max(max_length - len(TRUNCATION_MARKER), 0)
        text = (text[:keep].rstrip() + TRUNCATION_MARKER)[-max_length:] if max_length > 0 else ""
    return text
