"""`turnserver healthcheck`: is the server running on this host alive (container health)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """`healthcheck`'s arguments."""
    p = sub.add_parser(
        "healthcheck",
        help="ask the running server on this host whether it is alive (container health)",
        description="Find the running server from the state file it writes at start "
        "(its pid and where it serves /healthz) and ask that endpoint, whatever "
        "--metrics-listen says: exit 0 when it answers 200, 1 otherwise.",
    )
    p.add_argument(
        "--state-file",
        metavar="FILE",
        help="the server's state file (default: $TURNSERVER_STATE_FILE, else "
        "$XDG_RUNTIME_DIR/turnserver/state.json, else /tmp/turnserver-UID/state.json: "
        "where the server writes it)",
    )
    p.add_argument("--timeout", type=float, default=3.0)


def run(args: argparse.Namespace) -> int:
    """Run it; returns the exit code."""
    from turnserver.ops.process.state_file import healthcheck_command

    return healthcheck_command(args)
