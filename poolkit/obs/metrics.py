"""Prometheus metrics for library pools: rare events counted in place, hot paths and gauges built at scrape time."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_asgi_app,
    make_wsgi_app,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from poolkit.core.state import get_state
from poolkit.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

# 1 ms to 30 s, as the on-call question is "how many queries were slower than X" at every order of magnitude.
QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ACQUIRE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONNECT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CLOSE_REASONS = ("idle", "lifetime", "error", "shutdown")
CONNECT_ERROR_REASONS = (
    "timeout",
    "dns",
    "auth",
    "too_many_connections",
    "ssl_required",
    "ssl_unavailable",
    "ssl_verify",
    "ssl_hostname",
    "ssl",
    "unreachable",
    "refused",
    "other",
)
# SQLSTATE classes an app sees most; series for them exist from the start so rate() works at once.
COMMON_SQLSTATE_CLASSES = ("08", "22", "23", "25", "40", "42", "53", "57", "none")
_SQLSTATE_CLASS = re.compile(r"^[0-9A-Z]{2}$")
LABELS = ("pool", "driver", "route")


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How often each worker writes its pools' state for the scraping worker in multiprocess mode.
MP_GAUGE_INTERVAL = 1.0


def multiprocess_mode() -> bool:
    """True when prometheus-client writes samples to files for a multi-worker server (gunicorn/uvicorn).

    That is prometheus-client's own switch, ``PROMETHEUS_MULTIPROC_DIR`` (it must be set before
    ``prometheus_client`` is imported). The common misspelling ``PROMETHEUS_MULTIPROCESS_DIR`` alone
    raises :class:`~poolkit.errors.ConfigError` instead of silently giving per-worker numbers.
    """
    legacy = os.environ.get("prometheus_multiproc_dir")  # noqa: SIM112 - prometheus-client's old name
    if os.environ.get(MULTIPROC_ENV) or legacy:
        return True
    if os.environ.get("PROMETHEUS_MULTIPROCESS_DIR"):
        raise ConfigError(
            "PROMETHEUS_MULTIPROCESS_DIR is set, but prometheus-client reads PROMETHEUS_MULTIPROC_DIR: "
            "rename the variable (set it before the workers start), or unset it for single-process metrics"
        )
    return False


_QUERY_DURATION_DOC = "Time a query took, from the driver's call to its result"
_ACQUIRE_DURATION_DOC = "Time a caller waited for a connection from the pool"
_ACQUIRE_WAITS_DOC = "Acquisitions that found every connection in use and had to wait (saturation)"


class Tally:
    """One pool's hot-path events on one thread, added up by :class:`PoolCollector` at scrape time.

    prometheus-client's ``Histogram.observe`` takes a lock for the sum and one for the bucket and walks the
    bounds in Python: about 2 µs on the CI machine, twice per query (statement and acquire). Here an
    observation is a C bisect and two additions. A Tally has one writer (an async pool's binding is one
    event loop, so one thread; the sync pool writes under its own lock), so it needs no lock; the scraping
    thread reads a snapshot that may miss the latest event, and ``_count`` is the sum of the buckets, so the
    exposition is always self-consistent.
    """

    __slots__ = ("acquire_buckets", "acquire_sum", "query_buckets", "query_sum", "waits")

    def __init__(self) -> None:
        self.query_buckets = [0] * (len(QUERY_BUCKETS) + 1)  # the last one is +Inf
        self.query_sum = 0.0
        self.acquire_buckets = [0] * (len(ACQUIRE_BUCKETS) + 1)
        self.acquire_sum = 0.0
        self.waits = 0

    def query(self, elapsed: float) -> None:
        """A statement took ``elapsed`` seconds."""
        # bisect_left: the first bound >= elapsed, which is Prometheus' inclusive `le`.
        self.query_buckets[bisect_left(QUERY_BUCKETS, elapsed)] += 1
        self.query_sum += elapsed

    def acquired(self, waited: float) -> None:
        """A caller waited ``waited`` seconds for a connection (served or timed out)."""
        self.acquire_buckets[bisect_left(ACQUIRE_BUCKETS, waited)] += 1
        self.acquire_sum += waited

    def waited(self) -> None:
        """An acquisition found the pool at max and had to wait."""
        self.waits += 1

    def add(self, other: Tally) -> None:
        """Fold ``other`` into this one (a retired binding's counts)."""
        for i, n in enumerate(other.query_buckets):
            self.query_buckets[i] += n
        for i, n in enumerate(other.acquire_buckets):
            self.acquire_buckets[i] += n
        self.query_sum += other.query_sum
        self.acquire_sum += other.acquire_sum
        self.waits += other.waits


class _ChildTally(Tally):
    """Multiprocess mode: the same calls, written through prometheus-client's file-backed children."""

    __slots__ = ("_acquire", "_query", "_waits")

    def __init__(self, query: Any, acquire: Any, waits: Any) -> None:
        super().__init__()
        self._query, self._acquire, self._waits = query, acquire, waits

    def query(self, elapsed: float) -> None:
        self._query.observe(elapsed)

    def acquired(self, waited: float) -> None:
        self._acquire.observe(waited)

    def waited(self) -> None:
        self._waits.inc()


class TallySeries:
    """Every Tally of one label set: the live ones, plus the sum of those retired (ended loops, closed pools).

    Kept for the life of the process, like a prometheus-client child, so a counter never goes backwards
    when a pool closes or a serverless invocation's event loop ends.
    """

    __slots__ = ("live", "retired")

    def __init__(self) -> None:
        self.live: list[Tally] = []
        self.retired = Tally()

    def total(self) -> Tally:
        out = Tally()
        out.add(self.retired)
        for tally in list(self.live):
            out.add(tally)
        return out


class _Metrics:
    """The metric objects, created once per process (see poolkit.core.state) and shared by every pool."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # The hot-path series (query and acquire durations, acquire waits) are Tallies read by PoolCollector
        # at scrape time; only multiprocess mode, where the collector cannot see other workers, needs
        # prometheus-client's file-backed objects for them.
        self.tallies: dict[tuple[str, str, str], TallySeries] = {}
        self.tally_lock = threading.Lock()
        self.query_duration: Histogram | None = None
        self.acquire_duration: Histogram | None = None
        self.acquire_waits: Counter | None = None
        if multiprocess_mode():
            self.query_duration = Histogram(
                "poolkit_query_duration_seconds",
                _QUERY_DURATION_DOC,
                LABELS,
                buckets=QUERY_BUCKETS,
                registry=registry,
            )
            self.acquire_duration = Histogram(
                "poolkit_pool_acquire_duration_seconds",
                _ACQUIRE_DURATION_DOC,
                LABELS,
                buckets=ACQUIRE_BUCKETS,
                registry=registry,
            )
            self.acquire_waits = Counter("poolkit_pool_acquire_waits", _ACQUIRE_WAITS_DOC, LABELS, registry=registry)
        self.slow_queries = Counter(
            "poolkit_slow_queries",
            "Queries slower than POOLKIT_SLOW_QUERY_SECONDS",
            LABELS,
            registry=registry,
        )
        self.query_errors = Counter(
            "poolkit_query_errors",
            "Queries that failed, by SQLSTATE class ('none' when the failure had no SQLSTATE)",
            (*LABELS, "sqlstate_class"),
            registry=registry,
        )
        self.acquire_timeouts = Counter(
            "poolkit_pool_acquire_timeouts",
            "Callers that gave up waiting for a connection (pool exhaustion)",
            LABELS,
            registry=registry,
        )
        self.opened = Counter("poolkit_connections_opened", "Connections the pool opened", LABELS, registry=registry)
        self.closed = Counter(
            "poolkit_connections_closed",
            "Connections the pool closed, by reason",
            (*LABELS, "reason"),
            registry=registry,
        )
        self.connect_errors = Counter(
            "poolkit_connect_errors",
            "Connection attempts that failed, by reason",
            (*LABELS, "reason"),
            registry=registry,
        )
        self.connect_duration = Histogram(
            "poolkit_connect_duration_seconds",
            "Time to open a connection (TCP, TLS, authentication)",
            LABELS,
            buckets=CONNECT_BUCKETS,
            registry=registry,
        )
        self.routed_statements = Counter(
            "poolkit_routed_statements",
            "Statements routed by classification (pool.routed()), by route taken and reason ('none' when pooled)",
            (*LABELS, "reason"),
            registry=registry,
        )
        # Only used in multiprocess mode, where a scrape-time collector cannot see other workers' pools.
        self.mp_gauges: dict[str, Gauge] = {}
        if multiprocess_mode():
            for name, doc, extra in _GAUGES:
                self.mp_gauges[name] = Gauge(
                    name, doc, (*LABELS, *extra), registry=registry, multiprocess_mode="livesum"
                )


class PoolStatsSource(Protocol):
    """What the collector needs from a pool."""

    @property
    def metric_labels(self) -> tuple[str, str, str]: ...

    def gauge_values(self) -> tuple[int, int, int, int, int]:
        """(in_use, idle, max, min, waiting)."""
        ...


_GAUGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("poolkit_pool_connections", "Open connections by state", ("state",)),
    ("poolkit_pool_max_connections", "The pool's max_size", ()),
    ("poolkit_pool_min_connections", "The pool's min_size", ()),
    ("poolkit_pool_waiting_requests", "Callers waiting for a connection right now", ()),
)


def pool_gauge_values() -> dict[tuple[str, str, str], list[int]]:
    """Every live pool's (in_use, idle, max, min, waiting), summed per label set (pools may share a name)."""
    for _ in range(3):
        try:
            pools = list(get_state().live_pools)
            break
        except RuntimeError:  # another thread added a pool while the WeakSet was being copied
            continue
    else:
        pools = []
    sums: dict[tuple[str, str, str], list[int]] = {}
    for pool in pools:
        source: PoolStatsSource = pool
        acc = sums.setdefault(source.metric_labels, [0, 0, 0, 0, 0])
        for i, v in enumerate(source.gauge_values()):
            acc[i] += v
    return sums


class PoolCollector(Collector):
    """Reads every live pool's state at scrape time, so the gauges are never stale or double-counted."""

    def collect(self) -> Iterator[Metric]:
        conns = GaugeMetricFamily("poolkit_pool_connections", _GAUGES[0][1], labels=[*LABELS, "state"])
        max_ = GaugeMetricFamily("poolkit_pool_max_connections", _GAUGES[1][1], labels=list(LABELS))
        min_ = GaugeMetricFamily("poolkit_pool_min_connections", _GAUGES[2][1], labels=list(LABELS))
        waiting = GaugeMetricFamily("poolkit_pool_waiting_requests", _GAUGES[3][1], labels=list(LABELS))
        for labels, (in_use, idle, mx, mn, wait) in pool_gauge_values().items():
            conns.add_metric([*labels, "in_use"], in_use)
            conns.add_metric([*labels, "idle"], idle)
            max_.add_metric(list(labels), mx)
            min_.add_metric(list(labels), mn)
            waiting.add_metric(list(labels), wait)
        yield from (conns, max_, min_, waiting)
        yield from tally_families()

    def describe(self) -> Iterable[Metric]:
        return []


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        running += n
        out.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
    return out


def tally_families() -> Iterator[Metric]:
    """The hot-path series of every pool this process ever had, summed per label set."""
    m = get_metrics()
    query = HistogramMetricFamily("poolkit_query_duration_seconds", _QUERY_DURATION_DOC, labels=list(LABELS))
    acquire = HistogramMetricFamily("poolkit_pool_acquire_duration_seconds", _ACQUIRE_DURATION_DOC, labels=list(LABELS))
    waits = CounterMetricFamily("poolkit_pool_acquire_waits", _ACQUIRE_WAITS_DOC, labels=list(LABELS))
    with m.tally_lock:
        series = list(m.tallies.items())
        totals = [(labels, s.total()) for labels, s in series]
    for labels, t in totals:
        query.add_metric(list(labels), _buckets(QUERY_BUCKETS, t.query_buckets), t.query_sum)
        acquire.add_metric(list(labels), _buckets(ACQUIRE_BUCKETS, t.acquire_buckets), t.acquire_sum)
        waits.add_metric(list(labels), t.waits)
    yield from (query, acquire, waits)


class _GaugePusher:
    """Multiprocess mode: writes this worker's pool state to its livesum gauge files.

    The scrape-time collector cannot run in multiprocess mode (the worker answering the scrape cannot see
    the other workers' pools), so each worker writes its own pools' state every ``MP_GAUGE_INTERVAL``
    seconds from a daemon thread, and once more when it answers a scrape itself; prometheus-client sums
    the files of live workers (``livesum``) and drops a dead worker's files in ``mark_process_dead``.
    """

    _lock = threading.Lock()
    _pushed: ClassVar[set[tuple[str, str, str]]] = set()

    @classmethod
    def push(cls) -> None:
        gauges = get_metrics().mp_gauges
        if not gauges:
            return
        with cls._lock:
            sums = pool_gauge_values()
            # A pool closed since the last push must not keep its connections in the sum.
            for labels in cls._pushed - sums.keys():
                sums[labels] = [0, 0, 0, 0, 0]
            for labels, (in_use, idle, mx, mn, waiting) in sums.items():
                gauges["poolkit_pool_connections"].labels(*labels, "in_use").set(in_use)
                gauges["poolkit_pool_connections"].labels(*labels, "idle").set(idle)
                gauges["poolkit_pool_max_connections"].labels(*labels).set(mx)
                gauges["poolkit_pool_min_connections"].labels(*labels).set(mn)
                gauges["poolkit_pool_waiting_requests"].labels(*labels).set(waiting)
            cls._pushed = {k for k, v in sums.items() if any(v)}

    @classmethod
    def ensure_running(cls, *, only_with_pools: bool = False) -> None:
        """Start the pushing thread in this process, once (a fork loses threads, hence the name check)."""
        try:
            if not multiprocess_mode() or (only_with_pools and not get_state().live_pools):
                return
        except ConfigError:
            return  # reported where the metrics are created; an at-fork hook must not raise
        with cls._lock:
            if any(t.name == _PUSHER_THREAD for t in threading.enumerate()):
                return
            threading.Thread(target=cls._run, name=_PUSHER_THREAD, daemon=True).start()

    @classmethod
    def _run(cls) -> None:
        while True:
            # Sleep first: in a freshly forked worker, poolkit's own at-fork hook has yet to reset the
            # parent's pool state that this process inherited.
            time.sleep(MP_GAUGE_INTERVAL)
            # A metrics thread must never die of one bad read; the next tick retries.
            with contextlib.suppress(Exception):
                cls.push()


_PUSHER_THREAD = "poolkit-metrics-gauges"


class _PushOnScrape(Collector):
    """Multiprocess mode: the answering worker writes its own pool state just before the files are read."""

    def collect(self) -> Iterator[Metric]:
        _GaugePusher.push()
        return iter(())

    def describe(self) -> Iterable[Metric]:
        return []


def get_metrics(registry: CollectorRegistry | None = None) -> _Metrics:
    """The process's metric objects, created (and the pool collector registered) on first use."""
    state = get_state()
    if state.metrics is None:
        reg = registry or REGISTRY
        state.metrics = _Metrics(reg)
        if not multiprocess_mode() and not state.collector_registered:
            reg.register(PoolCollector())
            state.collector_registered = True
    metrics: _Metrics = state.metrics
    return metrics


def count_routed(pool: str, driver: str, route: str, reason: str) -> None:
    """Count one statement routed by ``pool.routed()`` (``reason`` is from routing.REASONS, or ``""``)."""
    get_metrics().routed_statements.labels(pool, driver, route, reason or "none").inc()


class PoolInstruments:
    """One pool's label-bound metric children: the hot path calls these without any label lookup."""

    __slots__ = (
        "_closed",
        "_errors",
        "_metrics",
        "acquire_timeouts",
        "connect_duration",
        "connect_errors",
        "labels",
        "opened",
        "slow_queries",
    )

    def __init__(self, pool: str, driver: str, route: str) -> None:
        m = get_metrics()
        self._metrics = m
        self.labels = (pool, driver, route)
        # Every series below exists (at zero) from the pool's creation: rate() and increase() need a
        # first sample before the first event, and a dashboard shows 0 rather than "no data".
        self.slow_queries = m.slow_queries.labels(*self.labels)
        self.acquire_timeouts = m.acquire_timeouts.labels(*self.labels)
        with m.tally_lock:
            m.tallies.setdefault(self.labels, TallySeries())
        self.opened = m.opened.labels(*self.labels)
        self.connect_duration = m.connect_duration.labels(*self.labels)
        self._errors = {c: m.query_errors.labels(*self.labels, c) for c in COMMON_SQLSTATE_CLASSES}
        self._closed = {r: m.closed.labels(*self.labels, r) for r in CLOSE_REASONS}
        self.connect_errors = {r: m.connect_errors.labels(*self.labels, r) for r in CONNECT_ERROR_REASONS}
        if m.mp_gauges:
            _GaugePusher.ensure_running()

    def new_tally(self) -> Tally:
        """A Tally for one writer (a binding's event loop, or the sync pool), counted until :meth:`retire`."""
        m = self._metrics
        if m.query_duration is not None and m.acquire_duration is not None and m.acquire_waits is not None:
            return _ChildTally(
                m.query_duration.labels(*self.labels),
                m.acquire_duration.labels(*self.labels),
                m.acquire_waits.labels(*self.labels),
            )
        tally = Tally()
        with m.tally_lock:
            m.tallies[self.labels].live.append(tally)
        return tally

    def retire(self, tally: Tally) -> None:
        """Its writer is gone: fold the counts into the series' total and stop tracking the object."""
        m = self._metrics
        with m.tally_lock:
            series = m.tallies.get(self.labels)
            if series is not None and any(t is tally for t in series.live):
                series.live = [t for t in series.live if t is not tally]
                series.retired.add(tally)

    def query_error(self, sqlstate: str | None) -> None:
        """Count a failed statement under its SQLSTATE class (``none`` without one)."""
        cls = sqlstate[:2] if sqlstate and _SQLSTATE_CLASS.match(sqlstate[:2]) else "none"
        child = self._errors.get(cls)
        if child is None:
            # Bounded: SQLSTATE classes are two characters from a fixed list of about forty.
            child = self._errors[cls] = self._metrics.query_errors.labels(*self.labels, cls)
        child.inc()

    def closed(self, reason: str) -> None:
        """Count a closed connection; an unknown reason counts as ``error``."""
        self._closed.get(reason, self._closed["error"]).inc()

    def connect_error(self, reason: str) -> None:
        """Count a failed connection attempt by ``ConnectError.reason``."""
        self.connect_errors.get(reason, self.connect_errors["other"]).inc()


def scrape_registry() -> CollectorRegistry:
    """The registry to expose: the default one, or in multiprocess mode one that sums every worker's files."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        registry.register(_PushOnScrape())
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    get_metrics()
    return REGISTRY


def asgi_app() -> Callable[..., Any]:
    """An ASGI app serving the metrics: ``app.mount("/metrics", poolkit.metrics.asgi_app())``."""
    return make_asgi_app(registry=scrape_registry())


def wsgi_app() -> Callable[..., Any]:
    """A WSGI app serving the metrics, for Flask/Django/gunicorn sync workers."""
    return make_wsgi_app(registry=scrape_registry())


def serve(port: int, addr: str = "127.0.0.1") -> WSGIServer:
    """Serve the metrics on ``http://addr:port/metrics`` from a daemon thread, for workers without a web app.

    ``port=0`` picks a free port: read it from the returned server's ``server_port``; ``shutdown()``
    stops it. The default address is loopback; pass ``addr="0.0.0.0"`` for a scraper on another host.
    """
    server, _thread = start_http_server(port, addr=addr, registry=scrape_registry())
    return server


def mark_process_dead(pid: int) -> None:
    """gunicorn ``child_exit`` hook in multiprocess mode: drop a dead worker's live gauges."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _after_fork_in_child() -> None:
    metrics = get_state().metrics
    if metrics is not None:
        # The parent may have held it at the moment of fork(); the child has no thread to release it.
        metrics.tally_lock = threading.Lock()
    # A worker forked from a process that already had pools (gunicorn --preload) starts its own pusher thread.
    _GaugePusher.ensure_running(only_with_pools=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
