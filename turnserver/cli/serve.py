"""`turnserver serve`: its flags, the settings they override, and starting one process or
a supervisor and its workers."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from turnserver.io.loop import LOOP_CHOICES
from turnserver.ops.config.schema import LOG_FORMATS, LOG_LEVELS
from turnserver.ops.config.values import (
    ConfigError,
    check_host_port_or_off,
    check_impairment_list,
    parse_account,
    parse_host_port,
    parse_listen,
    parse_user,
)


def impairment_arguments(p: argparse.ArgumentParser, *, flag: bool = True) -> None:
    """--dev (unless flag is False), --impair and --impair-seed."""
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


def add_parser(sub: Any) -> None:
    """`serve`'s flags."""
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
    impairment_arguments(p)
    p.add_argument(
        "--other-address",
        metavar="IP:PORT",
        help="a second udp:// listener, named in Binding responses (RFC 5780 OTHER-ADDRESS)",
    )
    p.add_argument(
        "--offload",
        choices=("off", "ebpf", "auto"),
        help="kernel fast path for channel-bound UDP flows (YAML relay.offload; default auto: "
        "on where the host allows it, else user space)",
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
        o["metrics_listen"] = check_host_port_or_off(args.metrics_listen, "--metrics-listen")
    if args.workers is not None:
        if not 1 <= args.workers <= 256:
            raise ConfigError("--workers: between 1 and 256")
        o["workers"] = args.workers
    if args.offload is not None:
        o["offload"] = args.offload
    if args.dev:
        o["dev"] = True
    if args.impair:
        o["impairments"] = check_impairment_list(list(args.impair), "--impair")
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
        "proxy_trusted": "proxy_trusted",
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
        "fleet_redis": "fleet_redis",
        "fleet_node": "fleet_node",
        "fleet_region": "fleet_region",
        "fleet_max_allocations_per_user": "fleet_max_allocations_per_user",
    }
    for arg, attr in simple.items():
        value = getattr(args, arg)
        if value is not None:
            o[attr] = tuple(value) if isinstance(value, list) else value
    return o


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings `serve`'s flags give, checked as the file's values are."""
    from turnserver.ops.config.values import (
        check_cidr_list,
        check_ip_list,
        check_label,
        check_node_name,
        check_redis_url,
        int_between,
    )

    overrides = _overrides(args)
    for key, check, flag in (
        ("relay_ips", check_ip_list, "--relay-ip"),
        ("external_ips", check_ip_list, "--external-ip"),
        ("allow_peers", check_cidr_list, "--allow-peer"),
        ("deny_peers", check_cidr_list, "--deny-peer"),
        ("proxy_trusted", check_cidr_list, "--proxy-trusted"),
        ("fleet_redis", check_redis_url, "--fleet-redis"),
        ("fleet_node", check_node_name, "--fleet-node"),
        ("fleet_region", check_label, "--fleet-region"),
        (
            "fleet_max_allocations_per_user",
            int_between(0, 1_000_000),
            "--fleet-max-allocations-per-user",
        ),
    ):
        if key in overrides:
            value = overrides[key]
            overrides[key] = check(list(value) if isinstance(value, tuple) else value, flag)
    return overrides


def run(args: argparse.Namespace) -> int:
    """`turnserver serve`: one process, or a supervisor and its workers."""
    from turnserver.ops.config.settings import (
        Settings,
        check_certificate,
        check_host_addresses,
        read_settings,
    )
    from turnserver.ops.process.app import serve

    try:
        overrides = serve_overrides(args)
        settings = read_settings(args.config, overrides)
        check_host_addresses(settings)
        if settings.cert_file and settings.key_file:
            check_certificate(settings.cert_file, settings.key_file)
    except ConfigError as exc:
        print(f"turnserver: configuration error: {exc}", file=sys.stderr)
        return 2
    config_path = args.config

    def reload_settings() -> Settings:
        return read_settings(config_path, overrides)

    if settings.workers > 1:
        import asyncio

        from turnserver.io.loop import loop_factory
        from turnserver.ops.process.supervisor import Supervisor
        from turnserver.ops.telemetry.eventlog import setup_logging

        setup_logging(settings.log_level, settings.log_format)
        try:
            supervisor = Supervisor(settings, config_path, overrides, args.show_credential)
        except OSError as exc:
            print(f"turnserver: {exc.strerror or exc}", file=sys.stderr)
            return 1
        _, factory = loop_factory(settings.loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(supervisor.run())
    return serve(settings, args.show_credential, reload_settings)
