"""Sidecar layer 3, stats: hot-path counters and the Prometheus collector."""
