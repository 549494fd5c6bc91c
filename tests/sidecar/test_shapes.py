"""Request shapes' run times (shapes.py), pure: which requests count as quick enough to be queued behind."""

from __future__ import annotations

from poolkit.sidecar.policy.shapes import DECAY, QUICK, RequestTimes, decayed_peak


def test_a_slow_run_counts_at_once_and_quick_runs_bring_it_back_slowly() -> None:
    assert decayed_peak(0.0001, 0.5) == 0.5  # one slow run: slow now
    peak, runs = 0.5, 0
    while peak >= QUICK:
        peak = decayed_peak(peak, 0.0001)
        runs += 1
    # A 0.5 s statement needs dozens of quick runs before anyone is queued behind it again.
    assert 50 <= runs <= 70, runs
    assert decayed_peak(0.0002, 0.0001) == 0.0002 * DECAY + 0.0001 * (1 - DECAY)


def test_only_shapes_seen_running_quickly_are_quick() -> None:
    times = RequestTimes()
    assert not times.quick(None)  # not a pipelinable request of a known shape
    assert not times.quick(b"SELECT 1")  # never seen: unknown is not quick
    times.observe(b"SELECT 1", 0.0002)
    times.observe(b"SELECT pg_sleep(", 0.05)
    assert times.quick(b"SELECT 1")
    assert not times.quick(b"SELECT pg_sleep(")
    times.observe(b"SELECT 1", 0.01)  # it ran slowly once: nothing is pipelined behind it for a while
    assert not times.quick(b"SELECT 1")
    assert repr(times) == f"<RequestTimes shapes=2 quick=0 limit={times.limit}>"


def test_the_table_is_bounded_and_forgets_the_oldest_shape() -> None:
    times = RequestTimes(limit=3)
    for n in range(5):
        times.observe(b"SELECT %d" % n, 0.0001)
    assert len(times) == 3
    assert not times.quick(b"SELECT 0") and not times.quick(b"SELECT 1")
    assert all(times.quick(b"SELECT %d" % n) for n in (2, 3, 4))
    assert repr(times) == "<RequestTimes shapes=3 quick=3 limit=3>"
