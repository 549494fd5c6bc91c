"""A fixed one-way network delay between two loopback processes, for tests and bench/ (not installed with poolkit).

``DelayRelay(host, port, delay_ms)`` starts ``netdelay`` (``netdelay.c`` beside this file, compiled on
first use with the system ``cc`` into a cache directory) on a free loopback port in front of
``host:port``. Every chunk it reads is written out ``delay_ms`` later, in order, in both directions: a
round trip through it costs ``2 * delay_ms`` plus what the endpoints take. Use it as a context manager or
``start()``/``stop()``; ``port`` is where clients connect::

    with DelayRelay("127.0.0.1", stack.pgbouncer_port, 1.0) as far:
        url = stack.pgbouncer.url(...).replace(str(stack.pgbouncer_port), str(far.port))
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import select
import shutil
import signal
import subprocess
import tempfile
from typing import Self

from poolkit.errors import DevStackError

__all__ = ["INSTALL_CC", "DelayRelay", "build_netdelay"]

INSTALL_CC = "apt-get install -y gcc"
_SOURCE = pathlib.Path(__file__).with_name("netdelay.c")
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "poolkit"


def build_netdelay(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The ``netdelay`` binary for this source, compiled with ``$CC`` or ``cc`` if it is not cached yet."""
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    directory = pathlib.Path(cache_dir) if cache_dir is not None else _cache_dir()
    binary = directory / f"netdelay-{digest}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    compiler = os.environ.get("CC") or "cc"
    found = shutil.which(compiler)
    if found is None:
        raise DevStackError(
            f"no C compiler ({compiler!r} is not on PATH): the delay relay is compiled at run time; "
            f"install one with `{INSTALL_CC}` or point CC at one"
        )
    directory.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: parallel test workers never run a half-written binary.
    fd, partial = tempfile.mkstemp(prefix="netdelay-", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run(
            [found, "-O2", "-Wall", "-Wextra", "-o", partial, str(_SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise DevStackError(f"compiling {_SOURCE.name} with {found} failed:\n{done.stderr[-2000:]}")
        os.chmod(partial, 0o700)  # mkstemp made it 0600; only this user runs it
        os.replace(partial, binary)
    finally:
        pathlib.Path(partial).unlink(missing_ok=True)
    return binary


class DelayRelay:
    """A TCP relay on ``listen_host:port`` (a free port) to ``target_host:target_port``, ``delay_ms`` each way.

    ``stop()`` (SIGTERM) ends every relayed connection; ``stats`` then holds what the relay counted
    (``accepted``, ``bytes_up`` towards the target, ``bytes_down`` back).
    """

    def __init__(self, target_host: str, target_port: int, delay_ms: float, *, listen_host: str = "127.0.0.1") -> None:
        if delay_ms < 0:
            raise DevStackError(f"delay_ms={delay_ms}: a delay cannot be negative")
        self.target = (target_host, target_port)
        self.delay_ms = delay_ms
        self.listen_host = listen_host
        self.port = 0
        self.stats: dict[str, int] = {}
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        """The relay's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Self:
        """Compile if needed, start, and return once the relay listens (a no-op while it runs)."""
        if self._proc is not None:
            return self
        binary = build_netdelay()
        delay_us = round(self.delay_ms * 1000)
        argv = [str(binary), self.listen_host, self.target[0], str(self.target[1]), str(delay_us)]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._proc = proc
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], _START_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("port "):
            self.stop()
            error = proc.stderr.read() if proc.stderr is not None else ""
            raise DevStackError(f"the delay relay did not start: {error.strip() or 'no output'}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        """SIGTERM the relay and wait for it (SIGKILL after 10 s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            for line in out.splitlines():
                if line.startswith("stats "):
                    self.stats = {k: int(v) for k, v in (item.split("=") for item in line.split()[1:])}
        else:
            proc.communicate()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._proc is not None else "stopped"
        return f"DelayRelay({state}, port={self.port} -> {self.target[0]}:{self.target[1]}, {self.delay_ms} ms)"
