"""Driver equivalence (poolkit.compare): a corpus over common column types, placeholders, the production guard."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import pytest

from poolkit import ConfigError
from poolkit.dev.compare import compare, dollar_to_percent, percent_to_dollar
from poolkit.dev.devstack import DevStack


@pytest.fixture
def dev_env(stack_env: DevStack, monkeypatch: pytest.MonkeyPatch) -> DevStack:
    monkeypatch.setenv("POOLKIT_ENV", "development")
    return stack_env


# (name, sql, args): every common column type, with the edge values where drivers tend to differ.
CORPUS: list[tuple[str, str, tuple[Any, ...]]] = [
    ("integers", "SELECT 1::int2, (-2147483648)::int4, 9223372036854775807::int8, NULL::int4", ()),
    ("floats", "SELECT 1.5::float4, -0.0::float8, 'NaN'::float8, 'Infinity'::float8, '-Infinity'::float4", ()),
    (
        "numeric",
        "SELECT 1.50::numeric(10, 2), 123456789012345678901234567890.123456789::numeric, 'NaN'::numeric, 0::numeric",
        (),
    ),
    ("numeric infinity", "SELECT 'Infinity'::numeric, '-Infinity'::numeric", ()),
    ("text types", "SELECT 'héllo'::text, 'x'::varchar(5), 'ab'::char(4), ''::text, 'a\"b''c'::text", ()),
    ("boolean", "SELECT true, false, NULL::bool", ()),
    ("date and time", "SELECT '2024-02-29'::date, '23:59:59.999999'::time, '12:00+05:30'::timetz", ()),
    (
        "timestamps",
        "SELECT '2024-03-31 01:30:00'::timestamp, '2024-03-31 01:30:00+02'::timestamptz, "
        "'1999-12-31 23:59:59.5-08'::timestamptz",
        (),
    ),
    ("interval", "SELECT '1 day 02:03:04.5'::interval, '-3 hours'::interval, '45 days'::interval", ()),
    ("uuid", "SELECT 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, gen_random_uuid() IS NOT NULL", ()),
    (
        "json and jsonb",
        """SELECT '{"b": [1, 2.5, null], "a": "x"}'::json, '{"z": {"y": true}, "n": 1e2}'::jsonb, 'null'::jsonb""",
        (),
    ),
    ("json arrays", """SELECT ARRAY['{"a":1}'::jsonb, '[]'::jsonb]""", ()),
    (
        "arrays",
        "SELECT ARRAY[1, NULL, 3]::int[], ARRAY['a', 'b,c', NULL]::text[], ARRAY[[1, 2], [3, 4]], '{}'::int[], "
        "ARRAY['2024-01-01'::date], ARRAY[1.5::numeric]",
        (),
    ),
    ("bytea", "SELECT '\\xdeadbeef'::bytea, ''::bytea, decode('00ff', 'hex')", ()),
    (
        "network",
        "SELECT '192.168.0.1'::inet, '10.0.0.0/8'::cidr, '2001:db8::1/64'::inet, '::1'::inet, '10.1.2.3/24'::inet",
        (),
    ),
    ("ranges", "SELECT int4range(1, 10), '[2024-01-01,2024-02-01)'::daterange, 'empty'::int4range", ()),
    ("bit strings", "SELECT B'1010'::bit(4), B'101'::varbit", ()),
    ("oid and names", "SELECT 'pg_class'::regclass::oid, 'x'::name, 'int4'::regtype::oid", ()),
    ("enum-like and domains", "SELECT 'abc'::information_schema.sql_identifier", ()),
    ("a table", "SELECT oid, relname, relpages FROM pg_class WHERE relname LIKE 'pg_cla%' ORDER BY oid", ()),
    ("parameters, $n", "SELECT $1::int + $2::int, $1::int, $3::text, $4::uuid", (2, 3, "x", uuid.UUID(int=5))),
    ("parameters, %s", "SELECT %s::int * 2, %s::text, '100%%' AS pct", (21, "y")),
    (
        "typed parameters",
        "SELECT $1::numeric, $2::date, $3::timestamptz, $4::bytea",
        (decimal.Decimal("1.25"), dt.date(2020, 1, 1), dt.datetime(2020, 1, 1, tzinfo=dt.UTC), b"\x00\x01"),
    ),
]


@pytest.mark.parametrize(("name", "sql", "args"), CORPUS, ids=[c[0] for c in CORPUS])
async def test_corpus_is_equivalent_after_normalising(dev_env: DevStack, name: str, sql: str, args: Any) -> None:
    result = await compare(sql, *args)
    assert result.same, str(result)
    assert len(result.asyncpg_rows) >= 1


async def test_normalising_is_what_makes_them_equal(dev_env: DevStack) -> None:
    """Without normalising, the raw values of the two drivers are not equal for these types."""
    result = await compare(
        """SELECT '{"a": 1}'::jsonb, '2024-01-01 00:00:00+00'::timestamptz, 'NaN'::numeric,
                  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid"""
    )
    assert result.same
    a, p = result.asyncpg_rows[0], result.psycopg_rows[0]
    assert a[0] != p[0]  # asyncpg: JSON text; psycopg: a dict
    assert a[2] != p[2]  # NaN is never equal to itself
    assert type(a[3]) is not type(p[3])  # asyncpg's own UUID class


async def test_real_differences_are_reported(dev_env: DevStack) -> None:
    result = await compare("SELECT clock_timestamp(), 1")
    assert not result.same
    assert [d.column for d in result.differences] == ["clock_timestamp"]
    assert "row 0 column 'clock_timestamp'" in str(result)
    shape = await compare("SELECT g FROM generate_series(1, (random() * 0)::int + 2) g")
    assert shape.same


async def test_queries_run_read_only(dev_env: DevStack) -> None:
    dev_env.psql("CREATE TABLE IF NOT EXISTS compare_probe (x int); GRANT ALL ON compare_probe TO app")
    with pytest.raises(Exception, match="read-only transaction"):
        await compare("INSERT INTO compare_probe VALUES (1) RETURNING x")
    assert dev_env.psql("SELECT count(*) FROM compare_probe").strip() == "0"


async def test_off_in_production(stack_env: DevStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POOLKIT_ENV", raising=False)
    with pytest.raises(ConfigError, match="POOLKIT_ENV=development"):
        await compare("SELECT 1")


def test_placeholder_translation() -> None:
    sql, args = dollar_to_percent("SELECT $2, '$1 %', $1 -- $3\n, $$ $1 $$, \"a$1\", 5 % 2, x$1", ("a", "b"))
    assert sql == "SELECT %s, '$1 %%', %s -- $3\n, $$ $1 $$, \"a$1\", 5 %% 2, x$1"
    assert args == ("b", "a")
    assert dollar_to_percent("SELECT $1, $1", (7,)) == ("SELECT %s, %s", (7, 7))
    # psycopg reads the whole text, literals included; the translation does the same.
    assert percent_to_dollar("SELECT %s, '100%%', 10 %% 3, %s") == "SELECT $1, '100%', 10 % 3, $2"
    with pytest.raises(ConfigError, match=r"uses \$2"):
        dollar_to_percent("SELECT $2", (1,))
    with pytest.raises(ConfigError, match="not supported"):
        percent_to_dollar("SELECT %(name)s")
