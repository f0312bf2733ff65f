"""The bodies of `serve`, `mint`, `preflight` and `check-config` behind the CLI's
argument parsing (turnserver/cli.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from turnserver.ops.config import build_settings, load_file
from turnserver.ops.config_secrets import read_secret_lines
from turnserver.ops.config_values import (
    ConfigError,
    _host_port_or_off,
    _impairment_list,
    parse_account,
    parse_host_port,
    parse_listen,
    parse_user,
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
    from turnserver.ops.config_values import (
        _cidr_list,
        _int,
        _ip_list,
        _label,
        _node_name,
        _redis_url,
    )

    overrides = _overrides(args)
    for key, check, flag in (
        ("relay_ips", _ip_list, "--relay-ip"),
        ("external_ips", _ip_list, "--external-ip"),
        ("allow_peers", _cidr_list, "--allow-peer"),
        ("deny_peers", _cidr_list, "--deny-peer"),
        ("proxy_trusted", _cidr_list, "--proxy-trusted"),
        ("fleet_redis", _redis_url, "--fleet-redis"),
        ("fleet_node", _node_name, "--fleet-node"),
        ("fleet_region", _label, "--fleet-region"),
        ("fleet_max_allocations_per_user", _int(0, 1_000_000), "--fleet-max-allocations-per-user"),
    ):
        if key in overrides:
            value = overrides[key]
            overrides[key] = check(list(value) if isinstance(value, tuple) else value, flag)
    return overrides


def serve_command(args: argparse.Namespace) -> int:
    """`turnserver serve`: one process, or a supervisor and its workers."""
    from turnserver.ops.app import serve
    from turnserver.ops.config import Settings, check_certificate, check_host_addresses

    try:
        file_values = load_file(args.config) if args.config else {}
        overrides = serve_overrides(args)
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

        from turnserver.io.loop import loop_factory
        from turnserver.ops.eventlog import setup_logging
        from turnserver.ops.process.supervisor import Supervisor

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


def mint_command(args: argparse.Namespace) -> int:
    """`turnserver mint`: print a credential as JSON; returns the exit code."""
    import json
    import time

    from turnserver.ops.credentials import (
        ServerUris,
        ice_servers_config,
        mint,
        parse_ttl,
        rest_api_credential,
        twilio_token,
    )
    from turnserver.ops.uris import server_uris

    try:
        ttl = parse_ttl(args.ttl)
    except ValueError as exc:
        print(f"turnserver mint: {exc}", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {}
    if args.secret:
        overrides["secrets"] = (args.secret,)
    if args.secrets_file:
        overrides["secrets_file"] = args.secrets_file
    if not (args.config or overrides):
        print(
            "turnserver mint: give --config FILE and/or --secret S (or --secrets-file F)",
            file=sys.stderr,
        )
        return 2
    account_sid = args.account_sid or "AC" + "0" * 32
    if args.config:
        try:
            # a secret given here replaces the config's (make run keeps it in .run/secret)
            values = load_file(args.config)
            if overrides:
                values.pop("secrets", None)
                values.pop("secrets_file", None)
            if not values.get("cert_file"):  # minting needs no certificate
                overrides.update(cert_file="unused", key_file="unused")
            settings = build_settings(values, overrides, args.config)
        except ConfigError as exc:
            print(f"turnserver mint: configuration error: {exc}", file=sys.stderr)
            return 2
        secret = settings.secrets[0]
        uris = server_uris(settings, list(settings.listen))
        if settings.accounts and not args.account_sid:
            account_sid = settings.accounts[0][0]
    else:
        try:
            secret = args.secret or read_secret_lines(args.secrets_file, "--secrets-file")[0]
        except (ConfigError, IndexError) as exc:
            print(f"turnserver mint: {exc or 'the secrets file is empty'}", file=sys.stderr)
            return 2
        uris = ServerUris((), ())
    if args.uri:
        uris = ServerUris(
            tuple(u for u in args.uri if u.startswith("stun")),
            tuple(u for u in args.uri if u.startswith("turn")),
        )
    bad = [u for u in args.uri if not u.startswith(("stun:", "stuns:", "turn:", "turns:"))]
    if bad:
        print(f"turnserver mint: not a STUN/TURN URI: {bad[0]}", file=sys.stderr)
        return 2
    now = time.time()
    cred = mint(secret, args.user, ttl, now)
    if args.format == "twilio":
        out = twilio_token(cred, uris, account_sid, now)
    elif args.format == "ice-servers":
        out = ice_servers_config(cred, uris, args.relay_only)
    else:
        out = rest_api_credential(cred, uris)
    print(json.dumps(out, indent=2))
    return 0


def check_config_command(args: argparse.Namespace) -> int:
    """`turnserver check-config FILE`: what `serve --config FILE` would refuse."""
    from turnserver.ops.config import check_certificate, check_host_addresses

    try:
        settings = build_settings(load_file(args.file), {}, args.file)
        check_host_addresses(settings)
        if settings.cert_file and settings.key_file:
            check_certificate(settings.cert_file, settings.key_file)
    except ConfigError as exc:
        print(f"turnserver check-config: {exc}", file=sys.stderr)
        return 2
    listeners = ", ".join(str(spec) for spec in settings.listen)
    print(f"{args.file}: OK ({listeners}; {settings.workers} workers)")
    return 0


def preflight_command(args: argparse.Namespace) -> int:
    """`turnserver preflight`: test the paths to a server; returns the exit code."""
    import asyncio
    import ssl
    import time

    from turnserver.client.ice_uri import IceUri, parse_uri
    from turnserver.client.preflight import as_json, as_table, load_ice_servers, run
    from turnserver.ops.credentials import mint

    try:
        uris: list[IceUri] = []
        username, password = args.username, args.password
        if args.secret and args.password:
            raise ValueError(
                "give either --secret (to mint a credential) or --username/--password, not both"
            )
        if args.secret:
            cred = mint(args.secret, username or "preflight", 600, time.time())
            username, password = cred.username, cred.password
        uris += [parse_uri(u, username, password) for u in args.uris]
        if args.credentials:
            uris += load_ice_servers(args.credentials, args.timeout)
    except (ValueError, OSError) as exc:
        print(f"turnserver preflight: {exc}", file=sys.stderr)
        return 2
    if not uris:
        print("turnserver preflight: give URIs or --credentials", file=sys.stderr)
        return 2
    if any(u.scheme != "stun" and not (u.username and u.credential) for u in uris):
        print(
            "turnserver preflight: no credentials given for the turn:/turns: URIs; "
            "use --secret, --username with --password, or --credentials",
            file=sys.stderr,
        )
        return 2
    try:
        ctx = (
            ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
        )
    except (OSError, ssl.SSLError) as exc:
        print(f"turnserver preflight: --ca {args.ca}: {exc}", file=sys.stderr)
        return 2
    if args.insecure:  # only --insecure skips verification; --ca keeps the host name check
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    report = asyncio.run(run(uris, packets=args.packets, timeout=args.timeout, ssl_context=ctx))
    try:
        print(as_json(report) if args.json else as_table(report), flush=True)
    except BrokenPipeError:  # `| head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0 if report.ok else 1
