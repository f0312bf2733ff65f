"""Command line: argument parsing only; the work is done in ops/."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from turnserver import __version__
from turnserver.io.loop import LOOP_CHOICES
from turnserver.ops.admin_cli import add_admin_parser
from turnserver.ops.config import (
    LOG_FORMATS,
    LOG_LEVELS,
)
from turnserver.ops.devcommand import add_dev_parser


def _dev_arguments(p: argparse.ArgumentParser, *, flag: bool = True) -> None:
    if flag:
        p.add_argument(
            "--dev",
            action="store_true",
            help="developer mode: impairment and /dev/v1/ endpoints (never in production)",
        )
    p.add_argument(
        "--impair",
        metavar="TRANSPORT=SPEC",
        action="append",
        help="impair relayed media (needs --dev): udp=block, tls=loss:5,delay:80, "
        "all=none; SPEC: block | loss:%% | delay:ms | jitter:ms | rate:kbit/s | "
        "duplicate:%% | reorder:%%, comma-separated (repeatable)",
    )
    p.add_argument("--impair-seed", metavar="N", type=int, help="random seed of the impairment (1)")


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the TURN/STUN server",
        description="Run the TURN/STUN server. Flags override the config file.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML config file (see config/turnserver.yaml)")
    p.add_argument("--realm", metavar="R", help="long-term credential realm")
    p.add_argument(
        "--secret",
        metavar="S",
        action="append",
        help="TURN REST API shared secret (repeatable; the first mints)",
    )
    p.add_argument(
        "--user",
        metavar="NAME:PASSWORD",
        action="append",
        help="static long-term user (repeatable)",
    )
    p.add_argument(
        "--admin-listen",
        metavar="IP:PORT",
        help="serve the admin API here (off by default; e.g. 127.0.0.1:9642)",
    )
    p.add_argument(
        "--admin-token",
        metavar="[NAME:]TOKEN",
        action="append",
        help="admin API bearer token, repeatable (YAML admin.tokens; admin.tokens_file)",
    )
    p.add_argument(
        "--admin-tokens-file", metavar="FILE", help="admin tokens, one [NAME:]TOKEN per line"
    )
    p.add_argument(
        "--revocations-file",
        metavar="FILE",
        help="where revocations persist (YAML admin.revocations_file; may be shared)",
    )
    p.add_argument(
        "--secrets-file",
        metavar="FILE",
        help="shared secrets, one per line (keeps them out of `ps`; YAML auth.secrets_file)",
    )
    p.add_argument(
        "--accounts-file",
        metavar="FILE",
        help="SID:AUTH_TOKEN lines for the Tokens API (YAML api.accounts_file)",
    )
    p.add_argument(
        "--api-keys-file",
        metavar="FILE",
        help="API keys, one per line (YAML api.keys_file)",
    )
    p.add_argument(
        "--listen",
        metavar="URI",
        action="append",
        help="listener, e.g. udp://0.0.0.0:3478 (repeatable)",
    )
    p.add_argument(
        "--relay-ip",
        metavar="IP",
        action="append",
        help="address relay sockets bind to (one per family)",
    )
    p.add_argument(
        "--external-ip",
        metavar="IP",
        action="append",
        help="relay address advertised to clients, behind NAT (one per family)",
    )
    p.add_argument("--min-port", metavar="N", type=int, help="lowest relay port")
    p.add_argument("--max-port", metavar="N", type=int, help="highest relay port")
    p.add_argument(
        "--allow-loopback-peers",
        action="store_true",
        default=None,
        help="let clients relay to 127.0.0.0/8 and ::1 (local development only)",
    )
    p.add_argument(
        "--allow-peer",
        metavar="CIDR",
        action="append",
        help="peer network to allow even if denied by default (repeatable)",
    )
    p.add_argument(
        "--deny-peer",
        metavar="CIDR",
        action="append",
        help="peer network to deny in addition to the defaults (repeatable)",
    )
    p.add_argument(
        "--proxy-trusted",
        metavar="CIDR",
        action="append",
        help="proxy network whose PROXY headers ?proxy= listeners believe (repeatable)",
    )
    p.add_argument(
        "--api-listen",
        metavar="IP:PORT",
        help="serve the credentials API (Twilio Tokens, TURN REST) here",
    )
    p.add_argument(
        "--account",
        metavar="SID:AUTH_TOKEN",
        action="append",
        help="account for the Twilio-compatible Tokens API (repeatable)",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        action="append",
        help="key for /api/v1/turn-credentials and /api/v1/ice-servers (repeatable)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="IP:PORT",
        help="Prometheus /metrics, /healthz, /readyz (default 127.0.0.1:9641; off)",
    )
    p.add_argument(
        "--probe-interval",
        metavar="SECONDS",
        type=float,
        help="self-probe every N seconds (default 30; 0 turns it off)",
    )
    _dev_arguments(p)
    p.add_argument(
        "--other-address",
        metavar="IP:PORT",
        help="a second udp:// listener, named in Binding responses (RFC 5780 OTHER-ADDRESS)",
    )
    p.add_argument(
        "--offload",
        choices=("off", "ebpf", "auto"),
        help="kernel fast path for channel-bound UDP flows (YAML relay.offload; default off)",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        type=int,
        help="processes sharing the listeners with SO_REUSEPORT (default: CPUs)",
    )
    p.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        type=float,
        help="on SIGTERM, wait this long for allocations to end (default 60)",
    )
    p.add_argument(
        "--alternate-server",
        metavar="IP:PORT",
        help="while draining, send new allocations there (300 Try Alternate)",
    )
    p.add_argument("--cert", metavar="FILE", help="TLS certificate chain (PEM) for tls://")
    p.add_argument("--key", metavar="FILE", help="TLS private key (PEM) for tls://")
    p.add_argument("--fleet-redis", metavar="URL", help="join a fleet on this Redis (fleet.redis)")
    p.add_argument("--fleet-node", metavar="NAME", help="this node's name (default: host name)")
    p.add_argument("--fleet-region", metavar="NAME", help="this node's region label")
    p.add_argument(
        "--fleet-max-allocations-per-user",
        metavar="N",
        type=int,
        help="allocations per user across the fleet (fleet.max_allocations_per_user; 0: off)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    p.add_argument("--log-format", choices=LOG_FORMATS, help="log format (default text)")
    p.add_argument("--loop", choices=LOOP_CHOICES, help="event loop (default auto: uvloop)")
    p.add_argument(
        "--show-credential",
        metavar="USER",
        help="print a ready-to-use credential for USER at start (development)",
    )


class ShortErrorParser(argparse.ArgumentParser):
    """One line and a hint on a bad argument, not the whole usage (exit 2)."""

    def error(self, message: str) -> NoReturn:
        hint = f"see: {self.prog} --help"
        if "expected one argument" in message:
            hint = "a value that starts with '-' must be written --option=VALUE; " + hint
        self.exit(2, f"{self.prog}: {message}\n  ({hint})\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ShortErrorParser(
        prog="turnserver",
        description="A self-hosted TURN/STUN relay with health monitoring.",
    )
    parser.add_argument("--version", action="version", version=f"turnserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ShortErrorParser)
    _serve_parser(sub)
    add_dev_parser(sub, _dev_arguments)
    p = sub.add_parser(
        "mint",
        help="print a time-limited TURN credential as JSON",
        description="Mint a TURN REST API credential from a shared secret and print it in "
        "the same JSON as the credentials API.",
    )
    p.add_argument("--user", required=True, help="user part of the credential (quotas count it)")
    p.add_argument("--ttl", default="1d", help="lifetime: seconds or 10m, 1h, 1d (default 1d)")
    p.add_argument(
        "--format",
        choices=("rest", "twilio", "ice-servers"),
        default="rest",
        help="rest: TURN REST API draft; twilio: Tokens resource; ice-servers: RTCConfiguration",
    )
    p.add_argument(
        "--relay-only", action="store_true", help="ice-servers: iceTransportPolicy relay"
    )
    p.add_argument("--config", metavar="FILE", help="take the secret and URIs from this config")
    p.add_argument(
        "--secret", metavar="S", help="shared secret (overrides the config's; alone: no URIs)"
    )
    p.add_argument(
        "--secrets-file", metavar="FILE", help="read the shared secret from this file instead"
    )
    p.add_argument(
        "--account-sid",
        metavar="SID",
        help="twilio format: the account_sid to put in the response (default: the first "
        "account of the config, else a placeholder AC000...)",
    )
    p.add_argument(
        "--uri",
        metavar="URI",
        action="append",
        default=[],
        help="stun:/turn:/turns: URI to include (repeatable; with --secret)",
    )
    p = sub.add_parser(
        "preflight",
        help="test which network paths to a STUN/TURN server work (a client)",
        description="Diagnose 'media connection failed': STUN Binding, a TURN allocation and "
        "a media round trip over each URI; prints a verdict. Exit code 0 when at least one "
        "media path works.",
    )
    p.add_argument(
        "uris",
        nargs="*",
        metavar="URI",
        help="stun:/turn:/turns: URIs (e.g. turn:turn.example.com:3478?transport=udp)",
    )
    p.add_argument(
        "--username", default="", help="TURN username (with --secret: the REST user part)"
    )
    p.add_argument("--password", default="", help="TURN password for the URIs given")
    p.add_argument(
        "--secret", help="mint the credential from this TURN REST shared secret (no --password)"
    )
    p.add_argument(
        "--credentials",
        metavar="URL_OR_FILE",
        help="a credentials endpoint or a saved response (Twilio Tokens, TURN REST "
        "draft or RTCConfiguration JSON)",
    )
    p.add_argument(
        "--packets",
        type=int,
        default=150,
        help="media packets per path, 160 bytes at 50 a second like a call (default 150: 3 s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds per step, and the longest wait for late media after the last packet",
    )
    p.add_argument(
        "--ca",
        metavar="FILE",
        help="trust this CA or self-signed certificate for turns: (the host name is still "
        "checked against it, as a browser does)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="check neither the TLS certificate nor its host name (testing only: browsers do both)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_admin_parser(sub)
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
    p = sub.add_parser(
        "check-config",
        help="validate a configuration file without starting the server",
        description="Read FILE as `serve --config FILE` would (schema, values, cross-field "
        "checks, certificate files, relay addresses of this host); print what is wrong "
        "with its file, line and key, exit 2, or OK.",
    )
    p.add_argument("file", metavar="FILE")
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
    return parser


# subcommand -> (module in ops/, function taking the parsed arguments)
COMMANDS = {
    "serve": ("turnserver.ops.commands", "serve_command"),
    "dev": ("turnserver.ops.devcommand", "dev_command"),
    "admin": ("turnserver.ops.admin_cli", "admin_command"),
    "mint": ("turnserver.ops.commands", "mint_command"),
    "preflight": ("turnserver.ops.commands", "preflight_command"),
    "check-config": ("turnserver.ops.commands", "check_config_command"),
    "healthcheck": ("turnserver.ops.state_file", "healthcheck_command"),
    "selfsigned": ("turnserver.ops.selfsigned", "selfsigned_command"),
    "fleet": ("turnserver.ops.fleet_registry", "fleet_command"),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in COMMANDS:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "serve":
        # until the event loop handles it: SIGHUP (a reload) must not end the process
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    module, name = COMMANDS[args.command]
    command: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
