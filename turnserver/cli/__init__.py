"""The command line: one module per subcommand, each with `add_parser(sub)` (its
arguments) and `run(args)` (its exit code), calling into ops/ for the work. Subcommand
modules import what their work needs only when run, so `--help` stays fast."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, NoReturn, Protocol

from turnserver import __version__
from turnserver.cli import (
    admin,
    check_config,
    dev,
    fleet,
    healthcheck,
    mint,
    preflight,
    selfsigned,
    serve,
)


class Subcommand(Protocol):
    """What each module of cli/ provides."""

    def add_parser(self, sub: Any) -> None: ...
    def run(self, args: argparse.Namespace) -> int: ...


# subcommand -> its module, in the order `--help` lists them
SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": serve,
    "dev": dev,
    "mint": mint,
    "preflight": preflight,
    "admin": admin,
    "selfsigned": selfsigned,
    "check-config": check_config,
    "healthcheck": healthcheck,
    "fleet": fleet,
}


class ShortErrorParser(argparse.ArgumentParser):
    """One line and a hint on a bad argument, not the whole usage (exit 2)."""

    def error(self, message: str) -> NoReturn:
        hint = f"see: {self.prog} --help"
        if "expected one argument" in message:
            hint = "a value that starts with '-' must be written --option=VALUE; " + hint
        self.exit(2, f"{self.prog}: {message}\n  ({hint})\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line's parser."""
    parser = ShortErrorParser(
        prog="turnserver",
        description="A self-hosted TURN/STUN relay with health monitoring.",
    )
    parser.add_argument("--version", action="version", version=f"turnserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ShortErrorParser)
    for module in SUBCOMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`turnserver COMMAND ...`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in SUBCOMMANDS:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "serve":
        # until the event loop handles it: SIGHUP (a reload) must not end the process
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
