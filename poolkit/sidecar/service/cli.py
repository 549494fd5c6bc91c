"""The ``poolkit sidecar`` command line: flags onto settings, then run until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from poolkit.errors import ConfigError, SidecarError
from poolkit.obs.log import configure_globally
from poolkit.sidecar.policy.config import load_sidecar_settings

# flag dest -> setting name
_FLAGS = {
    "listen_host": "listen_host",
    "listen_port": "listen_port",
    "unix_socket_dir": "unix_socket_dir",
    "http_host": "http_host",
    "http_port": "http_port",
    "max_size": "max_size",
    "upstream": "upstream",
    "upstream_mode": "upstream_mode",
    "auth_type": "auth_type",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sidecar's flags to ``parser`` (flags win over env ``POOLKIT_SIDECAR_*`` and the file)."""
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("POOLKIT_SIDECAR_CONFIG") or None,
        help="TOML file with sidecar settings, lowest precedence (env POOLKIT_SIDECAR_CONFIG)",
    )
    parser.add_argument("--listen-host", help="address for clients (default 127.0.0.1)")
    parser.add_argument("--listen-port", type=int, help="port for clients (default 6432)")
    parser.add_argument("--unix-socket-dir", type=Path, help="also listen on DIR/.s.PGSQL.<port>")
    parser.add_argument("--http-host", help="address for /metrics, /healthz, /readyz (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, help="port for /metrics (default 9930)")
    parser.add_argument("--no-http", action="store_true", help="do not serve /metrics")
    parser.add_argument(
        "--max-size", type=int, help="upstream connections at most (default 3; 10 in front of a transaction pooler)"
    )
    parser.add_argument(
        "--upstream", choices=["auto", "pooled", "direct"], help="forward to the pooled or the direct URL"
    )
    parser.add_argument(
        "--upstream-mode",
        choices=["auto", "session", "transaction"],
        help="does the upstream keep sessions (auto: the pooled URL is a transaction pooler)",
    )
    parser.add_argument("--auth-type", choices=["auto", "scram-sha-256", "trust"], help="client authentication")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        setting: getattr(args, dest) for dest, setting in _FLAGS.items() if getattr(args, dest, None) is not None
    }
    if getattr(args, "no_http", False):
        overrides["http_enabled"] = False
    return overrides


def run(args: argparse.Namespace) -> int:
    """Run the sidecar in the foreground; 0 after a clean SIGTERM drain, 2 for bad settings."""
    from poolkit.sidecar.service.app import run_sidecar  # noqa: PLC0415 - keep `poolkit --help` fast

    # The sidecar owns its process: its lifecycle events (started, draining, reloaded) are INFO.
    configure_globally(level=logging.INFO)
    overrides = overrides_from(args)
    config_file = getattr(args, "config", None)
    try:
        settings = load_sidecar_settings(config_file, **overrides)
    except ConfigError as exc:
        print(f"poolkit sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        return run_sidecar(settings, config_file=config_file, overrides=overrides)
    except SidecarError as exc:
        print(f"poolkit sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poolkit sidecar", description="PostgreSQL transaction-pooling sidecar")
    add_arguments(parser)
    return run(parser.parse_args(argv))
