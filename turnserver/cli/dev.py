"""`turnserver dev`: a ready-to-use local server for relay-only testing (developer mode)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """`dev`'s arguments."""
    from turnserver.cli.serve import impairment_arguments

    p = sub.add_parser(
        "dev",
        help="a local server for relay-only testing, with impairment",
        description="Start a local TURN server for development: UDP and TCP on --port, "
        "TLS on --tls-port (self-signed certificate for localhost), loopback peers "
        "allowed, the /preflight page and the impairment endpoint on --api-port. "
        "Prints a credential, the iceServers JSON and the URLs.",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    p.add_argument("--port", type=int, default=3478, help="UDP and TCP port (3478)")
    p.add_argument("--tls-port", type=int, default=5349, help="TLS port (5349)")
    p.add_argument("--api-port", type=int, default=8080, help="HTTP API port (8080)")
    p.add_argument("--admin-port", type=int, default=0, help="admin API port (off)")
    p.add_argument("--metrics-port", type=int, default=0, help="metrics port (off)")
    p.add_argument("--min-port", type=int, default=0, help="lowest relay port")
    p.add_argument("--max-port", type=int, default=65535, help="highest relay port")
    p.add_argument("--state-dir", help="secret, keys and certificate (~/.local/state/...)")
    p.add_argument("--ready-file", help="write the credential and URLs here as JSON")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    impairment_arguments(p, flag=False)


def run(args: argparse.Namespace) -> int:
    """Run it; returns the exit code."""
    from turnserver.ops.dev.local_server import dev_command

    return dev_command(args)
