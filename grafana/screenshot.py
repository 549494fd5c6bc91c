"""Draw the key panels of poolkit's dashboards from a live Prometheus into one PNG (matplotlib).

There is no Grafana in CI, so this is the picture of what the dashboards show: it takes each key panel's
PromQL from grafana/dashboards/*.json (as shipped), fills in the dashboard variables as Grafana's "All" would,
runs it as a range query against Prometheus's HTTP API and plots the series with the panel's legend format
and unit (series that stayed at zero are left out, as Grafana's "hide series with only zeros" does).
tests/ops/test_live_proof.py runs it on its workload's data; `POOLKIT_SCREENSHOT=1` there writes
docs/dashboard.png. Against any Prometheus that scrapes poolkit:

    .venv/bin/python grafana/screenshot.py --prometheus http://127.0.0.1:9090 --minutes 30 --out dash.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.dates import DateFormatter
from matplotlib.ticker import FuncFormatter, PercentFormatter

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"
# (dashboard file, panel title): the panels an on-call engineer looks at first.
KEY_PANELS = (
    ("poolkit-pools.json", "Queries/s"),
    ("poolkit-pools.json", "Query latency p50 / p95 / p99"),
    ("poolkit-pools.json", "Pool utilisation (in use / max)"),
    ("poolkit-pools.json", "Waiting requests"),
    ("poolkit-pools.json", "Acquire timeouts (exhaustion) and waits/s"),
    ("poolkit-sidecar.json", "Transactions/s and queries/s"),
    ("poolkit-sidecar.json", "Clients: active / waiting / idle"),
    ("poolkit-sidecar.json", "Servers: active / idle / connecting"),
    ("poolkit-sidecar.json", "Prepared-statement cache hit ratio"),
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def substitute(expr: str, rate_interval: str) -> str:
    """The dashboards' variables as Grafana fills them with every variable at "All" (".*")."""
    values = {"job": ".*", "instance": ".*", "pool": ".*", "datasource": "prometheus"}
    values |= {"__rate_interval": rate_interval, "__interval": rate_interval, "__range": "5m"}

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise SystemExit(f"no value for Grafana variable ${name} in: {expr}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def panel(file: str, title: str) -> dict[str, Any]:
    """The panel called `title` in the rendered dashboard `file`."""
    dashboard = json.loads((DASHBOARDS / file).read_text())
    for candidate in dashboard["panels"]:
        if candidate["title"] == title:
            found: dict[str, Any] = candidate
            return found
    raise SystemExit(f"{file} has no panel {title!r}: update KEY_PANELS after renaming a panel")


def query_range(client: httpx.Client, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    response = client.get(
        "/api/v1/query_range", params={"query": expr, "start": f"{start}", "end": f"{end}", "step": f"{step}"}
    )
    body = response.json()
    if body.get("status") != "success":
        raise SystemExit(f"Prometheus refused {expr}: {body.get('error')}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _formatter(unit: str) -> Any:
    if unit == "percentunit":
        return PercentFormatter(1.0)
    if unit == "s":
        return FuncFormatter(lambda v, _: f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s")
    if unit == "ops":
        return FuncFormatter(lambda v, _: f"{v:g}/s")
    return FuncFormatter(lambda v, _: f"{v:g}")


def draw_panel(
    ax: Axes, client: httpx.Client, spec: dict[str, Any], window: tuple[float, float, float], rate: str
) -> None:
    start, end, step = window
    drawn = 0
    for target in spec["targets"]:
        for series in query_range(client, substitute(target["expr"], rate), start, end, step):
            labels = series["metric"]
            legend = _LEGEND.sub(lambda m, labels=labels: labels.get(m.group(1), ""), target["legendFormat"]).strip()
            points = [(datetime.fromtimestamp(float(t)), float(v)) for t, v in series["values"]]
            points = [(t, v) for t, v in points if math.isfinite(v)]
            # Series that stayed at zero (pools that never timed out, ...) only crowd the legend.
            if any(v != 0 for _, v in points):
                times, values = zip(*points, strict=True)
                ax.plot(times, values, linewidth=1.4, label=legend or target["refId"])
                drawn += 1
    unit = spec["fieldConfig"]["defaults"]["unit"]
    ax.set_title(spec["title"], fontsize=10, loc="left")
    ax.yaxis.set_major_formatter(_formatter(unit))
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))
    ax.set_ylim(bottom=0, top=1.05 if unit == "percentunit" else None)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=7)
    if drawn:
        ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def draw(prometheus: str, start: float, end: float, out: Path, *, step: float = 1.0, rate: str = "5s") -> None:
    """Query the key panels over [start, end] and write them as one PNG to `out`."""
    fig, axes = plt.subplots(3, 3, figsize=(16, 10.5), constrained_layout=True)
    with httpx.Client(base_url=prometheus, timeout=30.0) as client:
        for ax, (file, title) in zip(axes.flat, KEY_PANELS, strict=True):
            draw_panel(ax, client, panel(file, title), (start, end, step), rate)
    fig.suptitle("poolkit dashboards: key panels (library pools, then sidecar), live data from Prometheus")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    parser.add_argument("--start", type=float, help="Unix time (default: --minutes before --end)")
    parser.add_argument("--end", type=float, help="Unix time (default: now)")
    parser.add_argument("--minutes", type=float, default=15.0, help="time range when --start is not given")
    parser.add_argument("--step", type=float, default=1.0, help="seconds between points")
    parser.add_argument("--rate-interval", default="5s", help="what $__rate_interval becomes (4 x scrape interval)")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    end = args.end or time.time()
    start = args.start or end - args.minutes * 60
    draw(args.prometheus, start, end, args.out, step=args.step, rate=args.rate_interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
