"""The `mint` and `preflight` commands behind the CLI's argument parsing."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from turnserver.ops.config import build_settings, load_file, read_secret_lines
from turnserver.ops.config_values import ConfigError


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
