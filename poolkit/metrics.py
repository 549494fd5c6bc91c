"""Public import path of the library's Prometheus endpoints; the code is in ``poolkit/obs/metrics.py``."""

from __future__ import annotations

from poolkit.obs.metrics import asgi_app, mark_process_dead, scrape_registry, serve, wsgi_app

__all__ = ["asgi_app", "mark_process_dead", "scrape_registry", "serve", "wsgi_app"]
