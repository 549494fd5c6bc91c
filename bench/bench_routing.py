"""Bench: routing classification with the hand-written lexer vs pglast over the SQL corpus.

Run: .venv/bin/python bench/bench_routing.py [--rounds N]

Every implementation runs uncached (the LRU in ``classify`` would otherwise answer everything
after the first round). Prints µs per statement for the whole corpus and for its pooled
statements (the hot path: application DML), the correctness against the corpus expectations,
and the agreement between lexer and pglast. Also times ``sqlnorm.normalize`` on the same text.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from corpus import Case, load_corpus  # noqa: E402
from support.pglast_reference import classify_pglast  # noqa: E402

from poolkit.sql import routing  # noqa: E402
from poolkit.sql.normalize import normalize  # noqa: E402
from poolkit.sql.routing import Decision  # noqa: E402


def _pglast_or_lexer(sql: str) -> Decision:
    return classify_pglast(sql) or routing._classify_lexer(sql)


def _hybrid(sql: str) -> Decision:
    """Prefilter, then pglast, then the lexer for what pglast cannot parse."""
    if routing._fast_pooled(sql):
        return routing.POOLED
    return _pglast_or_lexer(sql)


IMPLEMENTATIONS: dict[str, Callable[[str], Decision]] = {
    "lexer": routing._classify_lexer,
    "pglast": _pglast_or_lexer,
    "prefilter+lexer (classify)": routing._classify_uncached,
    "prefilter+pglast": _hybrid,
}


def _time(fn: Callable[[str], object], statements: list[str], rounds: int) -> float:
    """Median over rounds of µs per statement."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for sql in statements:
            fn(sql)
        samples.append((time.perf_counter() - start) / len(statements) * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    cases: list[Case] = load_corpus()
    every = [c.sql for c in cases]
    pooled = [c.sql for c in cases if c.route == "pooled"]
    unparsed = sum(classify_pglast(sql) is None for sql in every)
    print(f"corpus: {len(cases)} statements ({len(pooled)} pooled), pglast cannot parse {unparsed}")
    print(f"{'implementation':28} {'µs/stmt all':>12} {'µs/stmt pooled':>15} {'correct':>9}")
    for name, fn in IMPLEMENTATIONS.items():
        correct = sum((fn(c.sql).route.value, fn(c.sql).reason) == (c.route, c.reason) for c in cases)
        t_all = _time(fn, every, args.rounds)
        t_pooled = _time(fn, pooled, args.rounds)
        print(f"{name:28} {t_all:12.1f} {t_pooled:15.1f} {correct:>5}/{len(cases)}")

    routing._classify_cached.cache_clear()
    for sql in every:
        routing.classify(sql)
    print(f"{'classify, cache hit':28} {_time(routing.classify, every, args.rounds):12.2f}")

    disagreements = [
        c for c in cases if routing._classify_lexer(c.sql) != (classify_pglast(c.sql) or routing._classify_lexer(c.sql))
    ]
    print(f"lexer vs pglast agreement: {len(cases) - len(disagreements)}/{len(cases)}")
    for c in disagreements:
        print(f"  {c.id}: lexer={routing._classify_lexer(c.sql)} pglast={classify_pglast(c.sql)}")
    print(
        f"sqlnorm.normalize: {_time(normalize, every, args.rounds):.1f} µs/stmt "
        f"(mean statement {statistics.mean(map(len, every)):.0f} chars)"
    )


if __name__ == "__main__":
    main()
