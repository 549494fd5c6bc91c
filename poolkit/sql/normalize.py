"""SQL normalisation for logs: literals and comments removed, lists collapsed, length capped."""

from __future__ import annotations

import re

from poolkit.sql.lex import E_STRING_END, QIDENT_END, STD_STRING_END, dollar_body_end, quoted_end, skip_block_comment

__all__ = ["TRUNCATION_MARKER", "normalize"]

#: Appended to a normalised statement that was cut at ``max_length``.
TRUNCATION_MARKER = " ...(truncated)"

# Hand-written rather than pglast.parser.normalize(): this must never raise (pglast rejects
# anything that is not valid SQL, including psycopg's %s placeholders and cut-off statements),
# must keep placeholders as written, and runs where pglast (an optional extra) may be absent.
#
# One search regex finds the next token that needs attention; everything between two such
# tokens (keywords, identifiers, operators, placeholders) is copied unchanged. The leading
# lookahead lets the regex engine skip ordinary characters cheaply (it halved the time per
# statement); string prefixes (E'', U&'', B'', X'', N'') are found by looking back from the quote.
# The lookbehinds stop a match from starting inside an identifier (`t1`, `a$1`), as PostgreSQL's
# lexer does.
_NEXT = re.compile(
    r"""
    (?=[-/"'$.\d])
    (?:
      (?P<line>--)                                     # comment to end of line
    | (?P<block>/\*)                                   # block comment, nests in PostgreSQL
    | (?P<qident>")                                    # quoted identifier: a name, kept
    | (?P<str>')                                       # string (prefix checked separately)
    | (?<![^\W\d]|\$)(?P<dollar>\$(?:[^\W\d]\w*)?\$)  # $tag$ … $tag$ ($1 is a placeholder)
    | (?<![\w$])(?P<num>
          0[xX][0-9a-fA-F_]* | 0[oO][0-7_]* | 0[bB][01_]*
        | (?:\d[\d_]*(?:\.(?!\.)[\d_]*)? | \.\d[\d_]*)(?:[eE][+-]?\d+)?
      )
    )
    """,
    re.VERBOSE,
)

_ITEM = r"(?:\?|\$\d+|%s|%\(\w+\)s|:\w+|-\s?\?|\.\.\.)"
# `IN (?, ?, ?)` -> `IN (...)`: the number of values is data too (and splits one query shape in
# many). Each pattern starts with its bracket, a literal the regex engine finds quickly; the
# keyword before it is checked by a lookbehind.
_IN_LIST = re.compile(rf"\((?:(?<=\b[Ii][Nn]\()|(?<=\b[Ii][Nn] \())\s?{_ITEM}(?:\s?,\s?{_ITEM})*\s?\)")
_ARRAY_LIST = re.compile(rf"\[(?<=\b[Aa][Rr][Rr][Aa][Yy]\[)\s?{_ITEM}(?:\s?,\s?{_ITEM})*\s?\]")
# `VALUES (?, ?), (?, ?), ...` -> `VALUES (?, ?), ...` (rows identical after normalisation).
_VALUES_ROWS = re.compile(
    r"\((?:(?<=\b[Vv][Aa][Ll][Uu][Ee][Ss]\()|(?<=\b[Vv][Aa][Ll][Uu][Ee][Ss] \())([^()]*\))(?:\s?,\s?\(\1)+"
)


def _starts_token(sql: str, i: int, floor: int) -> bool:
    """Whether the character at ``i`` starts a token (is not the tail of a longer word)."""
    if i < floor:
        return False
    return i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] in "_$")


def _string_start(sql: str, quote: int, floor: int) -> tuple[bool, int]:
    """(is an E'' string, index of its first character) for the quote at ``quote``.

    ``floor`` is where unconsumed text starts. A prefix letter counts only when it is a word of
    its own: ``name'x'`` is the word ``name`` and a plain string, for PostgreSQL too.
    """
    before = sql[quote - 1] if quote > floor else ""
    if before in ("e", "E") and _starts_token(sql, quote - 1, floor):
        return True, quote - 1
    if before and before in "bBxXnN" and _starts_token(sql, quote - 1, floor):
        return False, quote - 1
    if before == "&" and quote - 2 >= floor and sql[quote - 2] in "uU" and _starts_token(sql, quote - 2, floor):
        return False, quote - 2
    return False, quote


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
        kind = m.lastgroup
        start = m.start()
        end = m.end()
        if kind == "str":
            escapes, start = _string_start(sql, start, pos)
            out.append(sql[pos:start])
            close = quoted_end(E_STRING_END if escapes else STD_STRING_END, sql, end)
            pos = n if close is None else close  # unterminated: runs to the end
            out.append("?")
            continue
        out.append(sql[pos:start])
        if kind == "line":
            nl = sql.find("\n", end)
            pos = n if nl < 0 else nl + 1
            out.append(" ")
        elif kind == "block":
            pos = skip_block_comment(sql, end)
            out.append(" ")
        elif kind == "qident":
            close = quoted_end(QIDENT_END, sql, end)
            if close is None:  # unterminated: PostgreSQL would reject it, and the rest may be data
                pos = n
                out.append('"?')
            else:
                pos = close
                out.append(sql[start:pos])
        elif kind == "dollar":
            pos = dollar_body_end(sql, m.group(), end)[1]
            out.append("?")
        else:  # num
            pos = end
            out.append("?")
    text = " ".join("".join(out).split())
    if "(" in text or "[" in text:
        text = _IN_LIST.sub("(...)", text)
        text = _ARRAY_LIST.sub("[...]", text)
        text = _VALUES_ROWS.sub(r"(\1, ...", text)
    if len(text) > max_length:
        keep = max(max_length - len(TRUNCATION_MARKER), 0)
        # With no room left for any SQL, the marker's leading space would be all that separates nothing.
        text = (text[:keep].rstrip() + TRUNCATION_MARKER)[-max_length:].strip() if max_length > 0 else ""
    return text
