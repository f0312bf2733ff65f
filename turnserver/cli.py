"""Command line: argument parsing only; the work is done in ops/."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, NoReturn

from turnserver import __version__
from turnserver.io.loop import LOOP_CHOICES
from turnserver.ops.admin_cli import add_admin_parser
from turnserver.ops.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    Settings,
    build_settings,
    check_certificate,
    check_host_addresses,
    load_file,
)
from turnserver.ops.config_values import (
    ConfigError,
    _host_port_or_off,
    _impairment_list,
    parse_account,
    parse_host_port,
    parse_listen,
    parse_user,
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
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if args.realm is not None:
        o["realm"] = args.realm
    if args.secret:
        o["secrets"] = tuple(args.secret)
    if args.user:
        o["users"] = tuple(parse_user(u, "--user") for u in args.user)
    if args.listen:
        o["listen"] = tuple(parse_listen(u, "--listen") for u in args.listen)
    if args.api_listen:
        o["api_listen"] = parse_host_port(args.api_listen, "--api-listen")
    if args.account:
        o["accounts"] = tuple(parse_account(a, "--account") for a in args.account)
    if args.api_key:
        o["api_keys"] = tuple(args.api_key)
    if args.admin_listen:
        o["admin_listen"] = parse_host_port(args.admin_listen, "--admin-listen")
    if args.admin_token:
        o["admin_tokens"] = tuple(args.admin_token)
    if args.metrics_listen is not None:
        o["metrics_listen"] = _host_port_or_off(args.metrics_listen, "--metrics-listen")
    if args.workers is not None:
        if not 1 <= args.workers <= 256:
            raise ConfigError("--workers: between 1 and 256")
        o["workers"] = args.workers
    if args.offload is not None:
        o["offload"] = args.offload
    if args.dev:
        o["dev"] = True
    if args.impair:
        o["impairments"] = _impairment_list(list(args.impair), "--impair")
    if args.impair_seed is not None:
        o["impair_seed"] = args.impair_seed
    if args.other_address is not None:
        o["other_address"] = parse_host_port(args.other_address, "--other-address")
    if args.drain_timeout is not None:
        o["drain_timeout"] = args.drain_timeout
    if args.alternate_server is not None:
        o["alternate_server"] = parse_host_port(args.alternate_server, "--alternate-server")
    if args.probe_interval is not None:
        if args.probe_interval < 0:
            raise ConfigError("--probe-interval: must be 0 (off) or more")
        o["probe_interval"] = args.probe_interval
    simple = {
        "relay_ip": "relay_ips",
        "external_ip": "external_ips",
        "min_port": "min_port",
        "max_port": "max_port",
        "allow_loopback_peers": "allow_loopback_peers",
        "allow_peer": "allow_peers",
        "deny_peer": "deny_peers",
        "log_level": "log_level",
        "log_format": "log_format",
        "loop": "loop",
        "cert": "cert_file",
        "key": "key_file",
        "secrets_file": "secrets_file",
        "admin_tokens_file": "admin_tokens_file",
        "revocations_file": "revocations_file",
        "accounts_file": "accounts_file",
        "api_keys_file": "api_keys_file",
    }
    for arg, attr in simple.items():
        value = getattr(args, arg)
        if value is not None:
            o[attr] = tuple(value) if isinstance(value, list) else value
    return o


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "serve":
        # until the event loop handles it: SIGHUP (a reload) must not end the process
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        from turnserver.ops.app import serve
        from turnserver.ops.config_values import _cidr_list, _ip_list

        try:
            file_values = load_file(args.config) if args.config else {}
            overrides = _overrides(args)
            for key, check, flag in (
                ("relay_ips", _ip_list, "--relay-ip"),
                ("external_ips", _ip_list, "--external-ip"),
                ("allow_peers", _cidr_list, "--allow-peer"),
                ("deny_peers", _cidr_list, "--deny-peer"),
            ):
                if key in overrides:
                    overrides[key] = check(list(overrides[key]), flag)
            settings = build_settings(file_values, overrides, args.config or "flags")
            check_host_addresses(settings)
            if settings.cert_file and settings.key_file:
                check_certificate(settings.cert_file, settings.key_file)
        except ConfigError as exc:
            print(f"turnserver: configuration error: {exc}", file=sys.stderr)
            return 2
        config_path = args.config

        def reload_settings() -> Settings:
            values = load_file(config_path) if config_path else {}
            return build_settings(values, overrides, config_path or "flags")

        if settings.workers > 1:
            import asyncio

            from turnserver.ops.eventlog import setup_logging
            from turnserver.ops.process.supervisor import Supervisor

            setup_logging(settings.log_level, settings.log_format)
            try:
                supervisor = Supervisor(settings, config_path, overrides, args.show_credential)
            except OSError as exc:
                print(f"turnserver: {exc.strerror or exc}", file=sys.stderr)
                return 1
            from turnserver.io.loop import loop_factory

            _, factory = loop_factory(settings.loop)
            with asyncio.Runner(loop_factory=factory) as runner:
                return runner.run(supervisor.run())
        return serve(settings, args.show_credential, reload_settings)

    if args.command == "dev":
        from turnserver.ops.devcommand import dev_command

        return dev_command(args)
    if args.command == "admin":
        from turnserver.ops.admin_cli import admin_command

        return admin_command(args)
    if args.command == "mint":
        from turnserver.ops.commands import mint_command

        return mint_command(args)
    if args.command == "preflight":
        from turnserver.ops.commands import preflight_command

        return preflight_command(args)
    if args.command == "selfsigned":
        from turnserver.ops.selfsigned import ensure_self_signed

        created, fingerprint = ensure_self_signed(
            args.cert, args.key, args.host or ["localhost", "127.0.0.1", "::1"], args.days
        )
        state = "created" if created else "kept existing"
        print(f"{state} {args.cert} (SHA-256 {fingerprint})")
        return 0

    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
