"""`turnserver fleet`: the servers of a fleet (the Redis registry) as a table."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """`fleet`'s arguments."""
    p = sub.add_parser(
        "fleet",
        help="show the servers of a fleet (the Redis registry) as a table",
        description="Read the node registry the servers of a fleet keep in Redis "
        "(fleet.redis) and show each node: region, state, load, URIs.",
    )
    p.add_argument("--redis", metavar="URL", help="the fleet's Redis (default: --config's)")
    p.add_argument("--config", metavar="FILE", help="take fleet.redis and its password from here")
    p.add_argument("--prefix", default=None, help='key prefix (default "turnserver:")')
    p.add_argument("--json", action="store_true", help="print the registry as JSON")


def run(args: argparse.Namespace) -> int:
    """Run it; returns the exit code."""
    from turnserver.ops.fleet.registry import fleet_command

    return fleet_command(args)
