"""asyncpg's own test suite through the sidecar (in front of PgBouncer), compared with direct and with PgBouncer.

The run itself is runner.py's (also ``scripts/conformance``). This test fails on any test that passes direct
and fails through the sidecar unless known_failures.toml lists it with its reason. To stay within a few
minutes it runs through PgBouncer only the sidecar's failures (``scripts/conformance`` runs all of them
there); the report, printed either way, says which of those PgBouncer fails too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .runner import KNOWN_FILE, Comparison, Outcome, load_known, run


def test_known_failures_file_is_well_formed() -> None:
    known = load_known()
    for test, reason in known.items():
        assert test.startswith("tests/test_") and "::" in test, f"{KNOWN_FILE.name}: {test} is not a node id"
        assert len(reason.split()) >= 4, f"{KNOWN_FILE.name}: {test} needs a reason a reader can check"


def test_the_verdict_counts_only_sidecar_failures_outside_the_known_file() -> None:
    """The comparison on outcomes as the runner records them (pure: no server)."""
    p, f, s = Outcome("passed"), Outcome("failed", "boom"), Outcome("skipped")
    results = {
        "direct": {"a": p, "b": p, "c": p, "d": f, "e": s, "k": p},
        "sidecar": {"a": p, "b": f, "c": f, "d": f, "e": s, "k": p},
        "pgbouncer": {"b": f, "c": p},
    }
    comparison = Comparison(results=results, known={"c": "reason", "k": "reason"}, modes=tuple(results))
    assert comparison.sidecar_regressions == {"b", "c"}  # d fails direct too; e is skipped
    assert comparison.unexpected == ["b"]
    assert not comparison.ok
    assert comparison.known_now_passing == ["k"]
    assert comparison.known_but_passing_bouncer == ["c"]
    assert comparison.counts()["sidecar"] == {"passed": 2, "failed": 3, "skipped": 1}
    assert "UNEXPECTED sidecar failures (1)" in comparison.report()
    assert Comparison(results=results, known={"b": "r", "c": "r"}, modes=tuple(results)).ok


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_asyncpg_suite_through_the_sidecar_matches_direct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    comparison: Comparison = run(workdir=tmp_path, pgbouncer="failures")
    with capsys.disabled():
        print("\n" + comparison.report())
    counts = comparison.counts()
    # The selection really ran: most of it passes direct (the rest skips itself on an unmanaged cluster).
    assert counts["direct"]["passed"] >= 250, counts
    assert not comparison.unexpected, (
        f"{len(comparison.unexpected)} asyncpg tests pass direct and fail through the sidecar, "
        f"not listed in {KNOWN_FILE.name}:\n" + comparison.report()
    )
