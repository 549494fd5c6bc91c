"""The ``poolkit`` command: ``dev``, ``demo``, ``sidecar``, ``check``, ``health``."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence


def _shown(url: str) -> str:
    """The URL without any user:password part (a probe URL may carry basic-auth credentials)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl()


SETTINGS_REFERENCE = (
    "Every setting (env POOLKIT_SIDECAR_<NAME>, or a key of the --config TOML file) with its default, and "
    "whether SIGHUP reloads it, is listed in README.md, section 'Settings reference' under 'The sidecar'; "
    "`SHOW CONFIG` on the admin console (psql -d poolkit) shows the values in effect."
)


def _sidecar_health_url(config: str | None) -> str:
    """The running sidecar's /readyz, from the same settings the sidecar reads (env, then the TOML file)."""
    from poolkit.sidecar.policy.config import load_sidecar_settings  # noqa: PLC0415 - only when --url is not given

    settings = load_sidecar_settings(config)
    if not settings.http_enabled:
        raise ValueError("the sidecar serves no /readyz (http_enabled is false): give --url")
    # A wildcard address is where it listens, not where to connect: probe loopback (nothing is bound here).
    wildcards = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
    host = wildcards.get(settings.http_host, settings.http_host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.http_port}/readyz"


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the URL answers 200 (the container HEALTHCHECK and probes use this)."""
    url = args.url
    if url is None:
        from poolkit.errors import ConfigError  # noqa: PLC0415

        try:
            url = _sidecar_health_url(args.config)
        except (ConfigError, ValueError) as exc:
            print(f"unhealthy: cannot tell where the sidecar listens: {exc}", file=sys.stderr)
            return 1
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310 - http(s) only, checked below
            ok = response.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {_shown(url)}: {exc}", file=sys.stderr)
        return 1
    print("ok" if ok else "unhealthy")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="start a local PostgreSQL (TLS, SCRAM) + PgBouncer stack and print its URLs")
    dev.add_argument("--pg-port", type=int)
    dev.add_argument("--pgbouncer-port", type=int)
    dev.add_argument("--dir", help="directory for the cluster (default: a new temporary one)")
    dev.add_argument("--keep", action="store_true", help="keep the directory when stopping")

    demo = sub.add_parser("demo", help="run a workload through poolkit pools against the local stack")
    demo.add_argument("--queries", type=int, default=1000, help="statements per driver (default 1000)")
    demo.add_argument("--tasks", type=int, default=20, help="concurrent tasks (default 20)")

    sidecar = sub.add_parser("sidecar", help="run the transaction-pooling PostgreSQL proxy", epilog=SETTINGS_REFERENCE)
    from poolkit.sidecar.service.cli import add_arguments  # noqa: PLC0415 - keep `poolkit dev` light

    add_arguments(sidecar)

    check = sub.add_parser("check", help="diagnose the configured URLs: DNS, TLS, auth, pooler type, budget")
    from poolkit.dev.check import add_arguments as add_check_arguments  # noqa: PLC0415

    add_check_arguments(check)

    health = sub.add_parser("health", help="exit 0 if a health URL answers 200 (container health checks)")
    health.add_argument(
        "--url",
        help="the URL to probe (default: the sidecar's /readyz, from its settings: "
        "POOLKIT_SIDECAR_HTTP_HOST/HTTP_PORT or the --config file)",
    )
    health.add_argument(
        "--config",
        default=os.environ.get("POOLKIT_SIDECAR_CONFIG") or None,
        help="the sidecar's TOML settings file (env POOLKIT_SIDECAR_CONFIG)",
    )
    health.add_argument("--timeout", type=float, default=3.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.command == "dev":
        try:
            import trustme  # noqa: F401, PLC0415 - only `poolkit dev` needs it: an extra, not a dependency
        except ImportError:
            print(
                "poolkit dev: the local stack makes its TLS certificates with trustme, which is not installed: "
                "pip install 'poolkit[devstack]'",
                file=sys.stderr,
            )
            return 1
        from poolkit.dev.devstack import run_dev  # noqa: PLC0415

        forwarded: list[str] = []
        for flag, value in (
            ("--pg-port", args.pg_port),
            ("--pgbouncer-port", args.pgbouncer_port),
            ("--dir", args.dir),
        ):
            if value is not None:
                forwarded += [flag, str(value)]
        if args.keep:
            forwarded.append("--keep")
        return run_dev(forwarded)
    if args.command == "demo":
        from poolkit.dev.demo import run_demo  # noqa: PLC0415

        return run_demo(queries=args.queries, tasks=args.tasks)
    if args.command == "check":
        from poolkit.dev.check import run as run_check  # noqa: PLC0415

        return run_check(args)
    if args.command == "sidecar":
        from poolkit.sidecar.service.cli import run  # noqa: PLC0415

        return run(args)
    return _health(args)


if __name__ == "__main__":
    raise SystemExit(main())
