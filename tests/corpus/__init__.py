"""Real ORM/migration/driver SQL with the route each statement must get (see the *.sql files)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
_EXPECT = re.compile(r"^-- expect: (pooled|direct (\w+))(?:\s+\((.*)\))?\s*$")


@dataclass(frozen=True)
class Case:
    """One corpus statement: where it comes from, its text and the expected route and reason."""

    source: str
    line: int
    note: str
    sql: str
    route: str
    reason: str

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


def load_corpus() -> list[Case]:
    """Every case of every ``*.sql`` file here: ``-- expect: pooled`` / ``-- expect: direct <reason>``."""
    cases: list[Case] = []
    for path in sorted(HERE.glob("*.sql")):
        header: tuple[int, str, str, str] | None = None
        body: list[str] = []

        def flush(header: tuple[int, str, str, str] | None, body: list[str], path: Path = path) -> None:
            if header is not None:
                line, route, reason, note = header
                sql = "\n".join(body).strip()
                assert sql, f"{path.name}:{line}: expectation without a statement"
                cases.append(Case(path.name, line, note, sql, route, reason))

        for number, text in enumerate(path.read_text().splitlines(), start=1):
            m = _EXPECT.match(text)
            if m:
                flush(header, body)
                route = "pooled" if m.group(1) == "pooled" else "direct"
                header = (number, route, m.group(2) or "", m.group(3) or "")
                body = []
            elif header is not None:
                body.append(text)
        flush(header, body)
    return cases
