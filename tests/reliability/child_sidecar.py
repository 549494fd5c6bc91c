"""A sidecar in a child process for the bad-input and soak tests: its memory is read from /proc, its output kept.

The sidecar conftest's ``sidecar_process`` reads the child's output only at exit; these tests make the
sidecar log thousands of lines, so here threads drain stdout/stderr while it runs (a full pipe would
block the sidecar) and keep every line for the secrets check.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from sidecar.conftest import sidecar_argv, stop_child

from poolkit.dev.devstack import DevStack, free_port

REPO = Path(__file__).resolve().parents[2]


def _raise_fd_limit() -> None:
    # 2,000 clients need more descriptors than some default soft limits (1024) allow.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class ChildSidecar:
    """``python -m poolkit.sidecar`` forwarding to ``stack``'s direct PostgreSQL (TLS verified, SCRAM).

    ``settings`` become ``POOLKIT_SIDECAR_<NAME>`` variables; ``direct_url`` replaces the upstream URL.
    ``lines`` holds everything it printed.
    """

    def __init__(self, stack: DevStack, *, direct_url: str | None = None, **settings: object) -> None:
        self.port = free_port()
        self.http_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_") and k != "DATABASE_URL"}
        env.update(
            {
                "POOLKIT_DIRECT_URL": direct_url or stack.url(via="direct", sslmode="verify-full"),
                "POOLKIT_SSLROOTCERT": str(stack.ca_file),
                "POOLKIT_SIDECAR_UPSTREAM": "direct",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update({f"POOLKIT_SIDECAR_{k.upper()}": str(v) for k, v in settings.items()})
        argv = sidecar_argv(self.port, self.http_port)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_raise_fd_limit,  # noqa: PLW1509 - only setrlimit, before exec
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._drains = [
            threading.Thread(target=self._drain, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for thread in self._drains:
            thread.start()
        self._wait_listening()

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}: {self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sidecar did not start listening within 30s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def url(self, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
        return f"postgresql://app@127.0.0.1:{self.port}/app?{query}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"

    def memory(self) -> dict[str, int]:
        """VmRSS, VmHWM (peak RSS) and VmPeak (peak virtual size) of the child, in KiB."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "VmPeak"):
                values[name] = int(rest.split()[0])
        return values

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, then wait (kill after 30 s); return the exit code."""
        code = stop_child(self.proc)
        for thread in self._drains:
            thread.join(timeout=10)
        return code
