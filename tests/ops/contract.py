"""The metric-name contract parsed from ARCHITECTURE.md, and a PromQL scanner for names and labels used."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .prom import REPO

ARCHITECTURE = REPO / "ARCHITECTURE.md"
# Series every scrape target has; the dashboards use `up` for "sidecar up".
PROMETHEUS_SERIES = frozenset({"up"})
PROMETHEUS_LABELS = frozenset({"job", "instance", "le", "__name__", "alertname", "alertstate"})
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
)
_TICKED = re.compile(r"`([^`]+)`")
_IDENTIFIER = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass
class Contract:
    """Metric names (with their type) and the label names ARCHITECTURE.md allows."""

    metrics: dict[str, str] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)

    def series_names(self) -> dict[str, str]:
        """Every series name a scrape exposes -> the contract metric it belongs to (histograms expand)."""
        names = {}
        for name, kind in self.metrics.items():
            names[name] = name
            if kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    names[name + suffix] = name
        return names


def contract() -> Contract:
    """Parse the tables under ARCHITECTURE.md's "Metric names" heading."""
    text = ARCHITECTURE.read_text()
    start = text.index("## Metric names")
    end = text.find("\n## ", start + 1)
    parsed = Contract()
    for line in text[start : end if end > 0 else len(text)].splitlines():
        if "(labels:" in line:
            parsed.labels.update(t for t in _TICKED.findall(line) if _IDENTIFIER.match(t))
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        kind = cells[1]
        for name in _TICKED.findall(cells[0]):
            parsed.metrics[name] = kind
        # An extra label is a ticked identifier at the start of the cell or after a comma.
        for match in re.finditer(r"(?:^|,\s*)`([a-z_]+)`", cells[2]):
            parsed.labels.add(match.group(1))
    if not parsed.metrics:
        raise AssertionError(f"no metric table found under '## Metric names' in {ARCHITECTURE}")
    return parsed


def scan(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used by a PromQL expression."""
    labels: set[str] = set()
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels.update(name.strip() for name in grouping.split(",") if name.strip())
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?!\w)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]|[eE]\d*|inf|nan", name, re.IGNORECASE):
            continue
        names.add(name)
    return names, labels


def violations(expr: str, allowed: Contract) -> list[str]:
    """What in `expr` is not in the contract: unknown metric names, unknown labels."""
    series = allowed.series_names()
    names, labels = scan(expr)
    problems = [
        f"metric {name!r} is not in ARCHITECTURE.md" for name in sorted(names - set(series) - PROMETHEUS_SERIES)
    ]
    unknown_labels = labels - allowed.labels - PROMETHEUS_LABELS
    problems += [f"label {label!r} is not in ARCHITECTURE.md" for label in sorted(unknown_labels)]
    return problems
