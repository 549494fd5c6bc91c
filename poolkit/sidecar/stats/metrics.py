"""The sidecar's Prometheus metrics: cheap hot-path counters, a collector reading pool state on scrape."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from poolkit.sidecar.policy.prepared import EVENTS as PREPARED_EVENTS
from poolkit.sidecar.policy.session import PIN_REASONS, ROUTE_REASONS

DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# timeout: a query ran past query_timeout and its server connection was closed.
UPSTREAM_ERROR_KINDS = ("connect", "auth", "tls", "terminated", "protocol", "timeout")
LOGIN_RESULTS = ("ok", "auth_failed", "error")


class Histogram:
    """A histogram that costs one bisect and two additions per observation.

    prometheus-client's Histogram takes a lock and updates a value object per bucket; at tens of
    thousands of transactions a second that is a visible share of the sidecar's CPU, so the hot path
    counts here and the collector turns the counts into cumulative buckets at scrape time.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((_fmt(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def _fmt(bound: float) -> str:
    return repr(float(bound))


class SidecarStats:
    """Counters the relay bumps as plain integer additions; read by the collector and ``SHOW STATS``."""

    __slots__ = (
        "client_logins",
        "client_wait",
        "pins",
        "pipeline_retries",
        "pipelined_requests",
        "prepared_statements",
        "queries",
        "query_duration",
        "query_time_total",
        "query_wait_timeouts",
        "received_bytes",
        "routed",
        "sent_bytes",
        "slow_queries",
        "transaction_duration",
        "transactions",
        "upstream_errors",
        "wait_time_total",
        "xact_time_total",
    )

    def __init__(self) -> None:
        self.transactions = 0
        self.queries = 0
        self.received_bytes = 0
        self.sent_bytes = 0
        self.query_wait_timeouts = 0
        self.slow_queries = 0
        self.pipelined_requests = 0  # requests written behind another client's on a busy server (server.py)
        self.pipeline_retries = 0  # of those, re-sent after a cancel meant for another client hit them
        self.upstream_errors = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self.client_logins = dict.fromkeys(LOGIN_RESULTS, 0)
        self.pins = dict.fromkeys(PIN_REASONS, 0)  # clients pinned, by the reason that pinned them
        self.routed = dict.fromkeys(ROUTE_REASONS, 0)  # transactions sent to the direct upstream
        self.prepared_statements = dict.fromkeys(PREPARED_EVENTS, 0)  # hit/miss/eviction (prepared.py)
        self.transaction_duration = Histogram()
        self.query_duration = Histogram()
        self.client_wait = Histogram()
        self.wait_time_total = 0.0
        self.xact_time_total = 0.0
        self.query_time_total = 0.0


class CountedPool(Protocol):
    """What the collector reads of a pool (``pool.UpstreamPool``), which sits above this module: it counts into it."""

    @property
    def name(self) -> str: ...
    @property
    def route(self) -> str: ...
    @property
    def stats(self) -> SidecarStats: ...
    @property
    def direct(self) -> CountedPool | None: ...
    def client_counts(self) -> dict[str, int]: ...
    def server_counts(self) -> dict[str, int]: ...
    def pinned_counts(self) -> dict[str, int]: ...


# SidecarStats counters with the pool as their only label: (attribute, metric name, help).
_POOL_COUNTERS = (
    ("transactions", "poolkit_sidecar_transactions", "Transactions completed (server released)."),
    ("queries", "poolkit_sidecar_queries", "Queries completed (ReadyForQuery received)."),
    (
        "query_wait_timeouts",
        "poolkit_sidecar_query_wait_timeouts",
        "Clients that waited query_wait_timeout for a server connection and got an error.",
    ),
    ("slow_queries", "poolkit_sidecar_slow_queries", "Queries slower than slow_query_seconds."),
    ("received_bytes", "poolkit_sidecar_received_bytes", "Bytes received from clients."),
    ("sent_bytes", "poolkit_sidecar_sent_bytes", "Bytes sent to clients."),
    (
        "pipelined_requests",
        "poolkit_sidecar_pipelined_requests",
        "Requests written to a busy server connection behind another client's (pipeline_depth).",
    ),
    (
        "pipeline_retries",
        "poolkit_sidecar_pipeline_retries",
        "Pipelined requests re-sent because a cancel meant for another client's query canceled them.",
    ),
)
# SidecarStats counters kept by one more (bounded) label: (attribute, metric name, help, label).
_LABELLED_COUNTERS = (
    ("upstream_errors", "poolkit_sidecar_upstream_errors", "Upstream connection errors by kind.", "kind"),
    ("client_logins", "poolkit_sidecar_client_logins", "Client login attempts by result.", "result"),
    ("pins", "poolkit_sidecar_pins", "Clients pinned to a server connection, by reason.", "reason"),
    (
        "routed",
        "poolkit_sidecar_routed",
        "Transactions sent to the direct upstream (introspection, DDL, server-side COPY), by reason.",
        "reason",
    ),
    (
        "prepared_statements",  # a direct pool shares its pooled pool's stats: counted once
        "poolkit_sidecar_prepared_statements",
        "Named prepared statements a client used: hit (already prepared on its server connection), miss "
        "(a Parse was sent), eviction (closed to keep max_prepared_statements per connection).",
        "event",
    ),
)
# SidecarStats histograms: (attribute, metric name, help).
_HISTOGRAMS = (
    (
        "transaction_duration",
        "poolkit_sidecar_transaction_duration_seconds",
        "Time a client held a server connection (one transaction).",
    ),
    ("query_duration", "poolkit_sidecar_query_duration_seconds", "Time from a query to its ReadyForQuery."),
    ("client_wait", "poolkit_sidecar_client_wait_seconds", "Time a client waited for a server connection."),
)


class SidecarCollector(Collector):
    """Builds every ``poolkit_sidecar_*`` metric from the pool(s) at scrape time."""

    def __init__(self, pools: Callable[[], Sequence[CountedPool]]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        clients = GaugeMetricFamily("poolkit_sidecar_clients", "Client connections by state.", labels=["pool", "state"])
        servers = GaugeMetricFamily(
            "poolkit_sidecar_servers", "Upstream server connections by state.", labels=["pool", "route", "state"]
        )
        pinned = GaugeMetricFamily(
            "poolkit_sidecar_pinned_clients",
            "Clients holding a server connection across transactions for session state, by reason.",
            labels=["pool", "reason"],
        )
        counters = [(attr, CounterMetricFamily(name, doc, labels=["pool"])) for attr, name, doc in _POOL_COUNTERS]
        labelled = [
            (attr, CounterMetricFamily(name, doc, labels=["pool", label]))
            for attr, name, doc, label in _LABELLED_COUNTERS
        ]
        histograms = [(attr, HistogramMetricFamily(name, doc, labels=["pool"])) for attr, name, doc in _HISTOGRAMS]
        for pool in self._pools():
            name, stats = pool.name, pool.stats
            for state, value in pool.client_counts().items():
                clients.add_metric([name, state], value)
            for upstream in (pool, pool.direct):
                if upstream is not None:
                    for state, value in upstream.server_counts().items():
                        servers.add_metric([name, upstream.route, state], value)
            for reason, value in pool.pinned_counts().items():
                pinned.add_metric([name, reason], value)
            for attr, counter in counters:
                counter.add_metric([name], getattr(stats, attr))
            for attr, counter in labelled:
                for label, value in getattr(stats, attr).items():
                    counter.add_metric([name, label], value)
            for attr, histogram in histograms:
                hist: Histogram = getattr(stats, attr)
                histogram.add_metric([name], hist.cumulative(), hist.sum)
        yield clients
        yield servers
        yield pinned
        for _, family in (*counters, *labelled, *histograms):
            yield family


def make_registry(pools: Callable[[], Sequence[CountedPool]]) -> CollectorRegistry:
    """A registry of its own per sidecar, so two sidecars in one process (tests) never collide."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(pools))
    return registry
