"""`turnserver check-config FILE`: what `serve --config FILE` would refuse, without serving."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from turnserver.ops.config.settings import read_settings
from turnserver.ops.config.values import ConfigError


def add_parser(sub: Any) -> None:
    """`check-config`'s argument."""
    p = sub.add_parser(
        "check-config",
        help="validate a configuration file without starting the server",
        description="Read FILE as `serve --config FILE` would (schema, values, cross-field "
        "checks, certificate files, relay addresses of this host); print what is wrong "
        "with its file, line and key, exit 2, or OK.",
    )
    p.add_argument("file", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    """`turnserver check-config FILE`: what `serve --config FILE` would refuse."""
    from turnserver.ops.config.settings import check_certificate, check_host_addresses

    try:
        settings = read_settings(args.file, {})
        check_host_addresses(settings)
        if settings.cert_file and settings.key_file:
            check_certificate(settings.cert_file, settings.key_file)
    except ConfigError as exc:
        print(f"turnserver check-config: {exc}", file=sys.stderr)
        return 2
    listeners = ", ".join(str(spec) for spec in settings.listen)
    print(f"{args.file}: OK ({listeners}; {settings.workers} workers)")
    return 0
