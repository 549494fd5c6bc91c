"""Prometheus metrics for library pools: events observed in place, pool gauges built at scrape time."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_asgi_app,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from poolkit.state import get_state

if TYPE_CHECKING:
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


def multiprocess_mode() -> bool:
    """True when prometheus-client writes samples to files for a multi-worker server (gunicorn/uvicorn)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROCESS_DIR") or os.environ.get("prometheus_multiproc_dir"))


class _Metrics:
    """The metric objects, created once per process (see poolkit.state) and shared by every pool."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.query_duration = Histogram(
            "poolkit_query_duration_seconds",
            "Time a query took, from the driver's call to its result",
            LABELS,
            buckets=QUERY_BUCKETS,
            registry=registry,
        )
        self.slow_queries = Counter(
            "poolkit_slow_queries", "Queries slower than POOLKIT_SLOW_QUERY_SECONDS", LABELS, registry=registry
        )
        self.query_errors = Counter(
            "poolkit_query_errors",
            "Queries that failed, by SQLSTATE class ('none' when the failure had no SQLSTATE)",
            (*LABELS, "sqlstate_class"),
            registry=registry,
        )
        self.acquire_duration = Histogram(
            "poolkit_pool_acquire_duration_seconds",
            "Time a caller waited for a connection from the pool",
            LABELS,
            buckets=ACQUIRE_BUCKETS,
            registry=registry,
        )
        self.acquire_timeouts = Counter(
            "poolkit_pool_acquire_timeouts",
            "Callers that gave up waiting for a connection (pool exhaustion)",
            LABELS,
            registry=registry,
        )
        self.acquire_waits = Counter(
            "poolkit_pool_acquire_waits",
            "Acquisitions that found every connection in use and had to wait (saturation)",
            LABELS,
            registry=registry,
        )
        self.opened = Counter(
            "poolkit_connections_opened", "Connections the pool opened", LABELS, registry=registry
        )
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


class PoolCollector(Collector):
    """Reads every live pool's state at scrape time, so the gauges are never stale or double-counted."""

    def collect(self) -> Iterator[Metric]:
        sums: dict[tuple[str, ...], list[int]] = {}
        for pool in list(get_state().live_pools):
            source: PoolStatsSource = pool
            labels = source.metric_labels
            values = source.gauge_values()
            acc = sums.setdefault(labels, [0, 0, 0, 0, 0])
            for i, v in enumerate(values):
                acc[i] += v
        conns = GaugeMetricFamily("poolkit_pool_connections", _GAUGES[0][1], labels=[*LABELS, "state"])
        max_ = GaugeMetricFamily("poolkit_pool_max_connections", _GAUGES[1][1], labels=list(LABELS))
        min_ = GaugeMetricFamily("poolkit_pool_min_connections", _GAUGES[2][1], labels=list(LABELS))
        waiting = GaugeMetricFamily("poolkit_pool_waiting_requests", _GAUGES[3][1], labels=list(LABELS))
        for labels, (in_use, idle, mx, mn, wait) in sums.items():
            conns.add_metric([*labels, "in_use"], in_use)
            conns.add_metric([*labels, "idle"], idle)
            max_.add_metric(list(labels), mx)
            min_.add_metric(list(labels), mn)
            waiting.add_metric(list(labels), wait)
        yield from (conns, max_, min_, waiting)

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


class PoolInstruments:
    """One pool's label-bound metric children: the hot path calls these without any label lookup."""

    __slots__ = (
        "_errors",
        "_metrics",
        "_mp",
        "acquire_duration",
        "acquire_timeouts",
        "acquire_waits",
        "connect_duration",
        "connect_errors",
        "labels",
        "opened",
        "query_duration",
        "slow_queries",
    )

    def __init__(self, pool: str, driver: str, route: str) -> None:
        m = get_metrics()
        self._metrics = m
        self.labels = (pool, driver, route)
        self.query_duration = m.query_duration.labels(*self.labels)
        self.slow_queries = m.slow_queries.labels(*self.labels)
        self.acquire_duration = m.acquire_duration.labels(*self.labels)
        self.acquire_timeouts = m.acquire_timeouts.labels(*self.labels)
        self.acquire_waits = m.acquire_waits.labels(*self.labels)
        self.opened = m.opened.labels(*self.labels)
        self.connect_duration = m.connect_duration.labels(*self.labels)
        self._errors = {c: m.query_errors.labels(*self.labels, c) for c in COMMON_SQLSTATE_CLASSES}
        for reason in CLOSE_REASONS:
            m.closed.labels(*self.labels, reason)
        self.connect_errors = {r: m.connect_errors.labels(*self.labels, r) for r in CONNECT_ERROR_REASONS}
        self._mp = m.mp_gauges

    def query_error(self, sqlstate: str | None) -> None:
        cls = sqlstate[:2] if sqlstate and _SQLSTATE_CLASS.match(sqlstate[:2]) else "none"
        child = self._errors.get(cls)
        if child is None:
            # Bounded: SQLSTATE classes are two characters from a fixed list of about forty.
            child = self._errors[cls] = self._metrics.query_errors.labels(*self.labels, cls)
        child.inc()

    def closed(self, reason: str) -> None:
        self._metrics.closed.labels(*self.labels, reason if reason in CLOSE_REASONS else "error").inc()

    def connect_error(self, reason: str) -> None:
        self.connect_errors.get(reason, self.connect_errors["other"]).inc()

    def push_gauges(self, values: tuple[int, int, int, int, int]) -> None:
        """Multiprocess mode only: write the pool's state where the scraping process can sum it."""
        if not self._mp:
            return
        in_use, idle, mx, mn, waiting = values
        self._mp["poolkit_pool_connections"].labels(*self.labels, "in_use").set(in_use)
        self._mp["poolkit_pool_connections"].labels(*self.labels, "idle").set(idle)
        self._mp["poolkit_pool_max_connections"].labels(*self.labels).set(mx)
        self._mp["poolkit_pool_min_connections"].labels(*self.labels).set(mn)
        self._mp["poolkit_pool_waiting_requests"].labels(*self.labels).set(waiting)


def scrape_registry() -> CollectorRegistry:
    """The registry to expose: the default one, or in multiprocess mode one that sums every worker's files."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    get_metrics()
    return REGISTRY


def asgi_app() -> Callable[..., Any]:
    """An ASGI app serving ``/metrics``: ``app.mount("/metrics", poolkit.metrics.asgi_app())``."""
    return make_asgi_app(registry=scrape_registry())  # type: ignore[no-any-return]


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` on ``addr:port`` from a background thread (for workers without a web framework)."""
    start_http_server(port, addr=addr, registry=scrape_registry())


def mark_process_dead(pid: int) -> None:
    """gunicorn ``child_exit`` hook in multiprocess mode: drop a dead worker's live gauges."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
