"""`turnserver selfsigned`: a self-signed certificate for local TLS, unless one exists."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """`selfsigned`'s arguments."""
    p = sub.add_parser(
        "selfsigned",
        help="create a self-signed TLS certificate if missing",
        description="Write a self-signed certificate and key (for local "
        "development) unless both files already exist.",
    )
    p.add_argument("--cert", metavar="FILE", required=True)
    p.add_argument("--key", metavar="FILE", required=True)
    p.add_argument(
        "--host",
        metavar="NAME",
        action="append",
        help="DNS name or IP the certificate is for (repeatable; default localhost, "
        "127.0.0.1, ::1)",
    )
    p.add_argument("--days", type=int, default=365)


def run(args: argparse.Namespace) -> int:
    """Run it; returns the exit code."""
    from turnserver.ops.dev.selfsigned import selfsigned_command

    return selfsigned_command(args)
