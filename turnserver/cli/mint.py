"""`turnserver mint`: print a time-limited TURN credential as JSON."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from turnserver.ops.config.secret_files import read_secret_lines
from turnserver.ops.config.settings import build_settings, load_file
from turnserver.ops.config.values import ConfigError


def add_parser(sub: Any) -> None:
    """`mint`'s arguments."""
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


def run(args: argparse.Namespace) -> int:
    """`turnserver mint`: print a credential as JSON; returns the exit code."""
    import json
    import time

    from turnserver.ops.config.uris import server_uris
    from turnserver.ops.http.credentials import (
        ServerUris,
        ice_servers_config,
        mint,
        parse_ttl,
        rest_api_credential,
        twilio_token,
    )

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
