"""Print a test's figures (case counts, soak numbers) to the terminal even when output is captured."""

from __future__ import annotations

import pytest


def write_summary(request: pytest.FixtureRequest, lines: list[str]) -> None:
    """Write ``lines`` to the terminal now (and to stdout, for ``-s`` and the junit report)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    print("\n".join(lines))
