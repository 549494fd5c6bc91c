"""Driver equivalence (development aid): run one read-only query on asyncpg and psycopg and report differences."""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from poolkit.errors import ConfigError
from poolkit.sql.lex import E_STRING_END, QIDENT_END, STD_STRING_END, dollar_body_end, quoted_end, skip_block_comment

if TYPE_CHECKING:
    from poolkit.core.settings import Settings

# OIDs of json, jsonb and their arrays: asyncpg returns these as text, psycopg as Python objects.
_JSON_OIDS = frozenset({114, 3802, 199, 3807})
_DOLLAR_QUOTE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$]")


def _segment_end(sql: str, i: int) -> int:
    """Where the string, quoted identifier, comment or dollar quote starting at ``i`` ends; -1 if none does."""
    ch = sql[i]
    if sql.startswith("--", i):
        nl = sql.find("\n", i)
        return len(sql) if nl < 0 else nl
    if sql.startswith("/*", i):
        return skip_block_comment(sql, i + 2)
    if ch == "'":
        escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not _IDENT_CHAR.match(sql[i - 2]))
        end = quoted_end(E_STRING_END if escapes else STD_STRING_END, sql, i + 1)
    elif ch == '"':
        end = quoted_end(QIDENT_END, sql, i + 1)
    elif ch == "$" and (i == 0 or not _IDENT_CHAR.match(sql[i - 1])):
        tag = _DOLLAR_QUOTE.match(sql, i)
        return -1 if tag is None else dollar_body_end(sql, tag.group(0), tag.end())[1]
    else:
        return -1
    return len(sql) if end is None else end  # unterminated: runs to the end


def _segments(sql: str) -> Iterator[tuple[bool, str]]:
    """Split ``sql`` into (is_code, text): string literals, quoted identifiers and comments are not code.

    Hand-written rather than pglast: it must keep the text byte for byte (pglast re-renders it), and the
    bodies of these five token kinds (scanned by ``poolkit.sql.lex``) are all placeholder translation needs.
    """
    i, n, start = 0, len(sql), 0
    while i < n:
        end = _segment_end(sql, i)
        if end < 0:
            i += 1
            continue
        if start < i:
            yield True, sql[start:i]
        yield False, sql[i:end]
        start = i = end
    if start < n:
        yield True, sql[start:]


def dollar_to_percent(sql: str, args: Sequence[Any]) -> tuple[str, tuple[Any, ...]]:
    """asyncpg's ``$1`` placeholders to psycopg's ``%s`` (and ``%`` to ``%%``), reordering ``args`` to match.

    ``$2 ... $1 ... $2`` becomes ``%s ... %s ... %s`` with arguments ``(a2, a1, a2)``; text inside string
    literals, quoted identifiers, dollar-quoted bodies and comments is left alone.
    """
    out: list[str] = []
    ordered: list[Any] = []

    def replace(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if not 1 <= index <= len(args):
            raise ConfigError(f"the query uses ${index} but {len(args)} argument(s) were given")
        ordered.append(args[index - 1])
        return "%s"

    for is_code, segment in _segments(sql):
        # psycopg reads % everywhere, string literals included, so every % is doubled.
        doubled = segment.replace("%", "%%")
        out.append(re.sub(r"(?<![A-Za-z0-9_$])\$(\d+)", replace, doubled) if is_code else doubled)
    return "".join(out), tuple(ordered)


def percent_to_dollar(sql: str) -> str:
    """psycopg's ``%s`` placeholders to asyncpg's ``$1, $2, ...`` (and ``%%`` to ``%``).

    Like psycopg itself, this reads the whole text: a ``%s`` or ``%%`` inside a string literal is
    a placeholder or an escaped percent sign there too.
    """
    counter = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal counter
        placeholder = match.group(0)
        if placeholder == "%%":
            return "%"
        if placeholder in ("%s", "%b", "%t"):
            counter += 1
            return f"${counter}"
        raise ConfigError(f"placeholder {placeholder!r} is not supported by compare(): use %s or $1")

    return re.sub(r"%(\([^)]*\))?[a-z%]", replace, sql)


def _style(sql: str) -> str:
    code = "".join(text for is_code, text in _segments(sql) if is_code)
    has_dollar = re.search(r"(?<![A-Za-z0-9_$])\$\d+", code) is not None
    has_percent = re.search(r"%[sbt(]", code) is not None
    if has_dollar and has_percent:
        raise ConfigError("the query mixes $1 and %s placeholders: use one style")
    return "percent" if has_percent else "dollar"


def normalise(value: Any, *, json_column: bool = False) -> Any:  # noqa: PLR0911, PLR0912 - one branch per value type, read top to bottom as the rules table they are
    """A driver-neutral form of one value: what both drivers should agree on.

    Aware datetimes go to UTC, UUID subclasses to uuid.UUID, JSON text (asyncpg) to Python objects,
    bytes-likes to bytes, single-host inet values to addresses, ranges and bit strings to tuples/str,
    NaN (float or numeric) to the string "NaN" so that it equals itself.
    """
    if value is None:
        return None
    if json_column and isinstance(value, str):
        return normalise(json.loads(value))
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else value
    if isinstance(value, decimal.Decimal):
        return "NaN" if value.is_nan() else value
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC) if value.tzinfo is not None else value
    if isinstance(value, dt.time) and value.tzinfo is not None:
        return (value.replace(tzinfo=None), value.utcoffset())
    if isinstance(value, uuid.UUID):
        return uuid.UUID(str(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        if value.network.prefixlen == value.max_prefixlen:
            return value.ip
        return value
    if isinstance(value, list | tuple) and type(value) in (list, tuple):
        return [normalise(v, json_column=json_column) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if hasattr(value, "isempty") and hasattr(value, "lower"):  # asyncpg.Range and psycopg Range
        bounds = getattr(value, "bounds", None)
        if bounds is None:
            bounds = ("[" if value.lower_inc else "(") + ("]" if value.upper_inc else ")")
        if value.isempty:
            return ("range", "empty")
        return ("range", normalise(value.lower), normalise(value.upper), bounds)
    if hasattr(value, "as_string") and type(value).__name__ == "BitString":  # asyncpg bit/varbit
        return str(value.as_string()).replace(" ", "")
    return value


@dataclass(frozen=True)
class Difference:
    """One place where the drivers disagree after normalisation (``row``/``column`` None for shape)."""

    row: int | None
    column: str | None
    asyncpg: Any
    psycopg: Any

    def __str__(self) -> str:
        where = "shape" if self.row is None else f"row {self.row} column {self.column!r}"
        return (
            f"{where}: asyncpg {self.asyncpg!r} ({type(self.asyncpg).__name__}) != "
            f"psycopg {self.psycopg!r} ({type(self.psycopg).__name__})"
        )


@dataclass
class Comparison:
    """The result of :func:`compare`: raw rows of both drivers and the differences that remain."""

    sql: str
    columns: list[str]
    asyncpg_rows: list[tuple[Any, ...]]
    psycopg_rows: list[tuple[Any, ...]]
    differences: list[Difference] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not self.differences

    def __str__(self) -> str:
        if self.same:
            return f"same result on asyncpg and psycopg ({len(self.asyncpg_rows)} row(s))"
        return "asyncpg and psycopg differ:\n" + "\n".join(f"  {d}" for d in self.differences)


def _diff(
    columns: list[str], oids: list[int], a_rows: list[tuple[Any, ...]], p_rows: list[tuple[Any, ...]]
) -> list[Difference]:
    if len(a_rows) != len(p_rows):
        return [Difference(None, None, f"{len(a_rows)} rows", f"{len(p_rows)} rows")]
    out: list[Difference] = []
    for r, (a_row, p_row) in enumerate(zip(a_rows, p_rows, strict=True)):
        for c, name in enumerate(columns):
            is_json = oids[c] in _JSON_OIDS
            a, p = normalise(a_row[c], json_column=is_json), normalise(p_row[c], json_column=is_json)
            if a != p or type(a) is not type(p):
                out.append(Difference(r, name, a_row[c], p_row[c]))
    return out


async def compare(sql: str, *args: Any, settings: Settings | None = None) -> Comparison:
    """Run ``sql`` in a READ ONLY transaction on asyncpg and on psycopg and compare the rows.

    A development aid for moving between drivers, off unless ``POOLKIT_ENV=development``
    (:class:`ConfigError` otherwise). Placeholders may be asyncpg's ``$1`` (translated to ``%s`` for
    psycopg, arguments reordered for repeated/out-of-order numbers) or psycopg's ``%s`` (translated
    to ``$1..$n``); literals, quoted names, dollar-quoted bodies and comments are never touched.
    The connections come from the configured pooled URL; the transactions always roll back.
    """
    # Here, not at the top: `import poolkit` imports this module, and must not load pydantic or the pools.
    from poolkit.core.settings import load_settings  # noqa: PLC0415
    from poolkit.pool.async_pool import Pool  # noqa: PLC0415

    cfg = settings if settings is not None else load_settings()
    if cfg.env != "development":
        raise ConfigError(
            "poolkit.compare() is a development aid and is off in production: set POOLKIT_ENV=development "
            f"(now {cfg.env!r}) where you compare drivers, never in a deployed app"
        )
    if _style(sql) == "percent":
        asyncpg_sql, psycopg_sql, psycopg_args = percent_to_dollar(sql), sql, tuple(args)
    else:
        asyncpg_sql = sql
        psycopg_sql, psycopg_args = dollar_to_percent(sql, args) if args else (sql, ())
    a_pool = Pool(cfg.model_copy(update={"driver": "asyncpg", "name": f"{cfg.name}-compare-asyncpg"}))
    p_pool = Pool(cfg.model_copy(update={"driver": "psycopg", "name": f"{cfg.name}-compare-psycopg"}))
    try:
        async with a_pool.acquire() as conn:
            tx = conn.transaction(readonly=True)
            await tx.start()
            try:
                a_records = await conn.fetch(asyncpg_sql, *args)
            finally:
                await tx.rollback()
        async with p_pool.acquire() as conn:
            try:
                await conn.execute("SET TRANSACTION READ ONLY")
                cur = await conn.execute(psycopg_sql, psycopg_args or None)
                p_rows = [tuple(r) for r in await cur.fetchall()] if cur.description else []
                description = cur.description or []
            finally:
                await conn.rollback()
    finally:
        await a_pool.close()
        await p_pool.close()
    columns = [d.name for d in description]
    oids = [d.type_code for d in description]
    a_rows = [tuple(r) for r in a_records]
    return Comparison(sql, columns, a_rows, p_rows, _diff(columns, oids, a_rows, p_rows))


__all__ = ["Comparison", "Difference", "compare", "dollar_to_percent", "normalise", "percent_to_dollar"]
