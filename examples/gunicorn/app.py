"""A small WSGI app on poolkit's SyncPool with /metrics for gunicorn's multiprocess mode (gunicorn.conf.py).

Routes: ``/query`` runs a short query and answers with the worker's pid; ``/metrics`` is the Prometheus
exposition summed over every worker; ``/healthz`` answers ``ok`` without touching the database.
The database comes from the environment like any poolkit app (``DATABASE_URL`` / ``POOLKIT_POOLED_URL``...).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import poolkit
import poolkit.metrics

POOL_NAME = os.environ.get("EXAMPLE_POOL_NAME", "gunicorn-example")

metrics_app = poolkit.metrics.wsgi_app()

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/metrics":
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path == "/query":
        # get_sync_pool(): one pool per worker process, created on first use after the fork.
        pool = poolkit.get_sync_pool(name=POOL_NAME, max_size=2)
        backend = pool.fetchval("select pg_backend_pid() from pg_sleep(0.2)")
        body = f"worker={os.getpid()} backend={backend}\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
