"""Observability of the library pools: Prometheus metrics, structlog events, per-pool instrumentation."""
