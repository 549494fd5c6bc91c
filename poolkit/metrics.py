"""Prometheus metrics for library pools: events observed in place, pool gauges built at scrape time."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from poolkit.errors import ConfigError
from poolkit.state import get_state

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

    def describe(self) -> Iterable[Metric]:
        return []


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
        # Every series below exists (at zero) from the pool's creation: rate() and increase() need a
        # first sample before the first event, and a dashboard shows 0 rather than "no data".
        self.query_duration = m.query_duration.labels(*self.labels)
        self.slow_queries = m.slow_queries.labels(*self.labels)
        self.acquire_duration = m.acquire_duration.labels(*self.labels)
        self.acquire_timeouts = m.acquire_timeouts.labels(*self.labels)
        self.acquire_waits = m.acquire_waits.labels(*self.labels)
        self.opened = m.opened.labels(*self.labels)
        self.connect_duration = m.connect_duration.labels(*self.labels)
        self._errors = {c: m.query_errors.labels(*self.labels, c) for c in COMMON_SQLSTATE_CLASSES}
        self._closed = {r: m.closed.labels(*self.labels, r) for r in CLOSE_REASONS}
        self.connect_errors = {r: m.connect_errors.labels(*self.labels, r) for r in CONNECT_ERROR_REASONS}
        if m.mp_gauges:
            _GaugePusher.ensure_running()

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


# A worker forked from a process that already had pools (gunicorn --preload) starts its own pusher thread.
os.register_at_fork(after_in_child=lambda: _GaugePusher.ensure_running(only_with_pools=True))
