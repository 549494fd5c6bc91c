"""gunicorn config for a poolkit app with 2+ workers: one Prometheus scrape shows every worker's numbers.

Run:  PROMETHEUS_MULTIPROC_DIR=/run/myapp-metrics gunicorn -c examples/gunicorn/gunicorn.conf.py app:app
      (from examples/gunicorn/, or pass --chdir). Scrape http://<bind>/metrics.

prometheus-client's multiprocess mode: each worker writes its samples to files in PROMETHEUS_MULTIPROC_DIR
and the worker that answers /metrics sums them. The variable must be set before any worker imports
prometheus_client, which is why it is set here (the master reads this file first) and why nothing below
imports poolkit.metrics at module level.
"""

import os
import shutil
import tempfile

# An explicit directory (environment) wins; otherwise a private one for this master.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="poolkit-metrics-"))

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "sync"  # the app uses poolkit's SyncPool; for ASGI use uvicorn's worker and poolkit.get_pool()
timeout = 30
graceful_timeout = 10


def on_starting(server):
    # Files left by a previous run would be summed into this one's counters: start from an empty directory.
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def child_exit(server, worker):
    # A dead worker's connections must leave the pool gauges (its counters rightly stay in the totals).
    from poolkit.metrics import mark_process_dead  # noqa: PLC0415 - after the env var is set

    mark_process_dead(worker.pid)
