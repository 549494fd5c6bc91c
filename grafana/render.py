"""Render poolkit's Grafana dashboards (grafana/dashboards/*.json) from one readable Python source.

Run `.venv/bin/python grafana/render.py` after editing; `--check` exits 1 when the JSON files are stale
(tests/ops runs it). Generated rather than hand-edited so every panel gets the same datasource, variables,
selectors and unit discipline, and a review reads PromQL instead of 2,000 lines of JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Every poolkit series is filtered by the three dashboard variables.
SEL = 'job=~"$job", instance=~"$instance", pool=~"$pool"'
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def _datasource_var() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def _query_var(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": "StandardVariableQuery"},
        "current": {},
        "hide": 0,
        # ".*" rather than Grafana's regex of every value: it also matches series without the label.
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
    }


def _variables(metric: str) -> list[dict[str, Any]]:
    return [
        _datasource_var(),
        _query_var("job", "Job", f"label_values({metric}, job)"),
        _query_var("instance", "Instance", f'label_values({metric}{{job=~"$job"}}, instance)'),
        _query_var("pool", "Pool", f'label_values({metric}{{job=~"$job", instance=~"$instance"}}, pool)'),
    ]


def _target(ref: str, expr: str, legend: str) -> dict[str, Any]:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}


def _panel(
    title: str,
    description: str,
    unit: str,
    targets: list[tuple[str, str]],
    *,
    kind: str = "timeseries",
    max_value: float | None = None,
    thresholds: list[tuple[str, float | None]] | None = None,
    stack: bool = False,
) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for color, value in (thresholds or [("green", None)])]
    defaults: dict[str, Any] = {
        "unit": unit,
        "min": 0,
        "thresholds": {"mode": "absolute", "steps": steps},
        "color": {"mode": "palette-classic" if kind == "timeseries" else "thresholds"},
    }
    if max_value is not None:
        defaults["max"] = max_value
    options: dict[str, Any]
    if kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if thresholds else "off"},
        }
        options = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value_and_name",
        }
    refs = "ABCDEFGH"
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [_target(refs[i], expr, legend) for i, (expr, legend) in enumerate(targets)],
    }


def _rate(metric: str, by: str, matchers: str = "") -> str:
    """Per-second rate of a counter over the selected series, summed by the labels `by`."""
    grouping = f"by ({by}) " if by else ""
    return f"sum {grouping}(rate({metric}{{{SEL}{matchers}}}[$__rate_interval]))"


def _sum(metric: str, by: str, matchers: str = "") -> str:
    """A gauge over the selected series, summed by the labels `by`."""
    return f"sum by ({by}) ({metric}{{{SEL}{matchers}}})"


def _quantiles(metric: str, sel: str, by: str) -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram, one line per value of the single label `by`."""
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))",
            f"{name} {{{{{by}}}}}",
        )
        for name, q in QUANTILES
    ]


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for index, panel in enumerate(panels):
        width = 6 if panel["type"] == "stat" else 12
        panel["id"] = index + 1
        panel["gridPos"] = {"h": 8, "w": width, "x": 0, "y": 0}
    x = y = 0
    for panel in panels:
        width = panel["gridPos"]["w"]
        if x + width > 24:
            x, y = 0, y + 8
        panel["gridPos"].update(x=x, y=y)
        x += width
    return panels


def _dashboard(uid: str, title: str, description: str, metric: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["poolkit", "postgresql"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": _variables(metric)},
        "annotations": {"list": []},
        "links": [],
        "panels": _layout(panels),
    }


def pools_dashboard() -> dict[str, Any]:
    """The library pools dashboard: one line per pool (and route) across the selected instances."""
    panels = [
        _panel(
            "Queries/s",
            "Statements completed per second through poolkit pools (poolkit_query_duration_seconds_count).",
            "ops",
            [(_rate("poolkit_query_duration_seconds_count", "pool, route"), "{{pool}} {{route}}")],
        ),
        _panel(
            "Query latency p50 / p95 / p99",
            "Statement duration quantiles from the poolkit_query_duration_seconds histogram, per pool.",
            "s",
            _quantiles("poolkit_query_duration_seconds", SEL, "pool"),
        ),
        _panel(
            "Slow queries/s",
            "Statements slower than POOLKIT_SLOW_QUERY_SECONDS per second; each also logs a slow_query event "
            "with the normalized SQL.",
            "ops",
            [(_rate("poolkit_slow_queries_total", "pool, route"), "{{pool}} {{route}}")],
        ),
        _panel(
            "Pool utilisation (in use / max)",
            "Connections checked out divided by max_size, worst instance per pool. Above 90 % for 5 minutes "
            "fires PoolkitPoolSaturated.",
            "percentunit",
            [
                (
                    f'max by (pool, route) (poolkit_pool_connections{{{SEL}, state="in_use"}}'
                    f" / ignoring (state) poolkit_pool_max_connections{{{SEL}}})",
                    "{{pool}} {{route}}",
                )
            ],
            max_value=1,
            thresholds=[("green", None), ("orange", 0.75), ("red", 0.9)],
        ),
        _panel(
            "Connections: in use, idle, max, min",
            "Pool state read at scrape time: connections in use and idle against the configured max "
            "and min, summed over the selected instances.",
            "short",
            [
                (_sum("poolkit_pool_connections", "pool, state"), "{{pool}} {{state}}"),
                (_sum("poolkit_pool_max_connections", "pool"), "{{pool}} max"),
                (_sum("poolkit_pool_min_connections", "pool"), "{{pool}} min"),
            ],
        ),
        _panel(
            "Waiting requests",
            "Callers currently queued for a connection because the pool is at max_size.",
            "short",
            [(_sum("poolkit_pool_waiting_requests", "pool, route"), "{{pool}} {{route}}")],
        ),
        _panel(
            "Acquire wait p95 / p99",
            "Time callers waited for a connection (poolkit_pool_acquire_duration_seconds). Close to "
            "acquire_timeout means exhaustion is near.",
            "s",
            _quantiles("poolkit_pool_acquire_duration_seconds", SEL, "pool")[1:],
        ),
        _panel(
            "Acquire timeouts (exhaustion) and waits/s",
            "Timeouts: callers that gave up waiting for a connection (they got PoolTimeout). "
            "Waits: acquisitions that found the pool at max and had to queue, the warning before timeouts.",
            "ops",
            [
                (_rate("poolkit_pool_acquire_timeouts_total", "pool"), "{{pool}} timeouts"),
                (_rate("poolkit_pool_acquire_waits_total", "pool"), "{{pool}} waits"),
            ],
            thresholds=[("green", None), ("red", 0.001)],
        ),
        _panel(
            "Connections opened / closed per second",
            "Server connections opened, and closed by reason (idle, lifetime, error, shutdown). "
            "Churn here on a serverless platform is the cost the sidecar removes.",
            "ops",
            [
                (_rate("poolkit_connections_opened_total", "pool"), "{{pool}} opened"),
                (
                    _rate("poolkit_connections_closed_total", "pool, reason"),
                    "{{pool}} closed ({{reason}})",
                ),
            ],
        ),
        _panel(
            "Connect duration p95 / p99",
            "How long opening a server connection takes (TCP, TLS and authentication), per pool.",
            "s",
            _quantiles("poolkit_connect_duration_seconds", SEL, "pool")[1:],
        ),
        _panel(
            "Connect errors/s",
            "Connection attempts that failed, by reason. Persisting errors fire PoolkitConnectErrors.",
            "ops",
            [
                (
                    _rate("poolkit_connect_errors_total", "pool, reason"),
                    "{{pool}} {{reason}}",
                )
            ],
            thresholds=[("green", None), ("red", 0.001)],
        ),
        _panel(
            "Query errors by SQLSTATE class",
            "Failed statements per second by SQLSTATE class (23 integrity, 40 rollback, 57 operator "
            "intervention, 08 connection; none = no SQLSTATE, e.g. a dropped connection).",
            "ops",
            [
                (
                    _rate("poolkit_query_errors_total", "pool, sqlstate_class"),
                    "{{pool}} class {{sqlstate_class}}",
                )
            ],
        ),
        _panel(
            "Routed statements by reason",
            "Statements sent through pool.routed(): route taken and why (ddl, catalog, session_set, ...; "
            "none = stayed pooled). Direct traffic spends the small direct-connection budget.",
            "ops",
            [
                (
                    _rate("poolkit_routed_statements_total", "pool, route, reason"),
                    "{{pool}} {{route}} {{reason}}",
                )
            ],
        ),
    ]
    return _dashboard(
        "poolkit-pools",
        "poolkit / library pools",
        "poolkit library pools (asyncpg, psycopg, psycopg-sync): throughput, latency, saturation, exhaustion.",
        "poolkit_pool_max_connections",
        panels,
    )


def sidecar_dashboard() -> dict[str, Any]:
    """The sidecar dashboard: clients, upstream servers, transactions, waits, prepared-statement cache."""
    panels = [
        _panel(
            "Sidecar up",
            "1 when Prometheus scraped the sidecar's /metrics on its last attempt, 0 when the scrape failed. "
            "Only targets that served sidecar metrics within the last hour, so a sidecar that went down "
            "stays on the panel (at 0) and other jobs' targets never appear.",
            "none",
            [
                (
                    # `up` alone would list every target of every job once $job is "All" (".*").
                    'up{job=~"$job", instance=~"$instance"} and on (job, instance) '
                    f"max by (job, instance) (last_over_time(poolkit_sidecar_servers{{{SEL}}}[1h]))",
                    "{{instance}}",
                )
            ],
            kind="stat",
            thresholds=[("red", None), ("green", 1)],
        ),
        _panel(
            "Query wait timeouts (exhaustion)",
            "Clients whose query waited longer than query_wait_timeout for a server connection, "
            "over the dashboard's time range.",
            "short",
            [(f"sum (increase(poolkit_sidecar_query_wait_timeouts_total{{{SEL}}}[$__range]))", "timeouts")],
            kind="stat",
            thresholds=[("green", None), ("red", 1)],
        ),
        _panel(
            "Clients: active / waiting / idle",
            "Client connections by state. Waiting clients have a statement ready but no server connection yet.",
            "short",
            [(_sum("poolkit_sidecar_clients", "state"), "{{state}}")],
        ),
        _panel(
            "Servers: active / idle / connecting",
            "Upstream server connections by state and route. Active + idle + connecting never "
            "exceeds max_size per route.",
            "short",
            [(_sum("poolkit_sidecar_servers", "state, route"), "{{route}} {{state}}")],
            stack=True,
        ),
        _panel(
            "Transactions/s and queries/s",
            "Transactions (server connection assigned until ReadyForQuery idle) and statements per second.",
            "ops",
            [
                (_rate("poolkit_sidecar_transactions_total", "pool"), "{{pool}} transactions"),
                (_rate("poolkit_sidecar_queries_total", "pool"), "{{pool}} queries"),
            ],
        ),
        _panel(
            "Client wait p50 / p95 / p99",
            "How long clients waited for a server connection (poolkit_sidecar_client_wait_seconds).",
            "s",
            _quantiles("poolkit_sidecar_client_wait_seconds", SEL, "pool"),
        ),
        _panel(
            "Transaction duration p50 / p95 / p99",
            "Time a server connection is held per transaction; long ones starve other clients.",
            "s",
            _quantiles("poolkit_sidecar_transaction_duration_seconds", SEL, "pool"),
        ),
        _panel(
            "Query duration p50 / p95 / p99",
            "Statement duration as seen by the sidecar, from first message to the statement's completion.",
            "s",
            _quantiles("poolkit_sidecar_query_duration_seconds", SEL, "pool"),
        ),
        _panel(
            "Slow queries/s and query wait timeouts/s",
            "Statements over POOLKIT_SLOW_QUERY_SECONDS (each logged as slow_query), and clients that hit "
            "query_wait_timeout (pool exhausted).",
            "ops",
            [
                (_rate("poolkit_sidecar_slow_queries_total", "pool"), "{{pool}} slow"),
                (
                    _rate("poolkit_sidecar_query_wait_timeouts_total", "pool"),
                    "{{pool}} wait timeouts",
                ),
            ],
        ),
        _panel(
            "Prepared-statement cache hit ratio",
            "Share of named prepared statements the sidecar found already prepared on the assigned server "
            "connection (hit / (hit + miss)). Low means re-Parse round trips.",
            "percentunit",
            [
                (
                    _rate("poolkit_sidecar_prepared_statements_total", "pool", ', event="hit"')
                    + " / "
                    + _rate("poolkit_sidecar_prepared_statements_total", "pool", ', event=~"hit|miss"'),
                    "{{pool}} hit ratio",
                )
            ],
            max_value=1,
        ),
        _panel(
            "Prepared statements: hits / misses / evictions per second",
            "Prepared-statement cache events per second.",
            "ops",
            [
                (
                    _rate("poolkit_sidecar_prepared_statements_total", "event"),
                    "{{event}}",
                )
            ],
        ),
        _panel(
            "Pipelined requests/s",
            "Requests written to a busy server connection behind another client's (pipeline_depth) instead of "
            "waiting for it. Near the transaction rate when every server connection is busy.",
            "ops",
            [(_rate("poolkit_sidecar_pipelined_requests_total", "pool"), "{{pool}} pipelined")],
        ),
        _panel(
            "Pinned clients",
            "Clients holding a server connection outside a transaction (session state such as LISTEN or a "
            "session-level SET), by reason. Each pins one of the max_size connections.",
            "short",
            [(_sum("poolkit_sidecar_pinned_clients", "reason"), "{{reason}}")],
        ),
        _panel(
            "Pins/s and routed/s",
            "New pins per second, and statements routed to the direct connection, by reason.",
            "ops",
            [
                (_rate("poolkit_sidecar_pins_total", "reason"), "pinned: {{reason}}"),
                (_rate("poolkit_sidecar_routed_total", "reason"), "routed: {{reason}}"),
            ],
        ),
        _panel(
            "Upstream errors/s",
            "Errors talking to PostgreSQL by kind: connect, auth, tls, terminated (backend killed), protocol.",
            "ops",
            [(_rate("poolkit_sidecar_upstream_errors_total", "kind"), "{{kind}}")],
            thresholds=[("green", None), ("red", 0.001)],
        ),
        _panel(
            "Client logins/s",
            "Client authentications by result (ok, auth_failed, error).",
            "ops",
            [(_rate("poolkit_sidecar_client_logins_total", "result"), "{{result}}")],
        ),
        _panel(
            "Client bytes in / out",
            "Bytes received from and sent to clients per second.",
            "binBps",
            [
                (_rate("poolkit_sidecar_received_bytes_total", ""), "received"),
                (_rate("poolkit_sidecar_sent_bytes_total", ""), "sent"),
            ],
        ),
    ]
    return _dashboard(
        "poolkit-sidecar",
        "poolkit / sidecar",
        "The poolkit sidecar (PostgreSQL transaction pooler): clients, upstream servers, waits, errors.",
        "poolkit_sidecar_servers",
        panels,
    )


def render() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {
        "poolkit-pools.json": json.dumps(pools_dashboard(), indent=2) + "\n",
        "poolkit-sidecar.json": json.dumps(sidecar_dashboard(), indent=2) + "\n",
    }


def main() -> int:
    """Write the dashboards, or with --check report which are stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a dashboard file is out of date")
    args = parser.parse_args()
    stale = []
    for name, text in render().items():
        path = DASHBOARDS / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            DASHBOARDS.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        sys.stderr.write(f"stale dashboards {stale}: run `.venv/bin/python grafana/render.py`\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
