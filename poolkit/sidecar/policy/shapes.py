"""How long each kind of pipelinable request runs, learned from its answers: which ones are quick."""

from __future__ import annotations

from typing import Final

# Quick enough that a request arriving together with it may wait behind it (pooling.may_pipeline) rather
# than wake another server connection: well under a network round trip to a managed database.
QUICK: Final = 0.001
# How fast an estimate forgets a slow run: after one 0.5 s run a shape needs ~60 quick runs to count
# as quick again, so an occasionally slow statement is not pipelined behind by mistake.
DECAY: Final = 0.9
SHAPES_LIMIT: Final = 512


def decayed_peak(previous: float, seconds: float) -> float:
    """The new estimate after a run of ``seconds``: a slow run counts at once, quick runs only slowly."""
    return max(seconds, previous * DECAY + seconds * (1 - DECAY))


class RequestTimes:
    """Run time per request shape (a named statement's key, a plain statement's text without its
    trailing literal), measured only for requests that ran pipelined behind another: the gap between
    two ReadyForQuery is then PostgreSQL's time for the request (more if it arrived after the one
    before it had ended), without the network's round trip.

    Shapes are SQL text and never leave this object (no log, no metric). Bounded: the oldest shape
    is forgotten first.
    """

    __slots__ = ("_peaks", "limit")

    def __init__(self, limit: int = SHAPES_LIMIT) -> None:
        self._peaks: dict[bytes, float] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._peaks)

    def __repr__(self) -> str:
        quick = sum(1 for peak in self._peaks.values() if peak < QUICK)
        return f"<RequestTimes shapes={len(self._peaks)} quick={quick} limit={self.limit}>"

    def observe(self, shape: bytes, seconds: float) -> None:
        """A request of ``shape`` ran ``seconds``."""
        peaks = self._peaks
        previous = peaks.get(shape)
        if previous is None:
            if len(peaks) >= self.limit:
                del peaks[next(iter(peaks))]
            peaks[shape] = seconds
        else:
            peaks[shape] = decayed_peak(previous, seconds)

    def quick(self, shape: bytes | None) -> bool:
        """Has ``shape`` been seen, and run quickly lately?"""
        if shape is None:
            return False
        peak = self._peaks.get(shape)
        return peak is not None and peak < QUICK
