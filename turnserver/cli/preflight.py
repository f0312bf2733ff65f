"""`turnserver preflight`: which network paths to a STUN/TURN server work (a client)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    """`preflight`'s arguments."""
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


def run(args: argparse.Namespace) -> int:
    """`turnserver preflight`: test the paths to a server; returns the exit code."""
    import asyncio
    import ssl
    import time

    from turnserver.client.ice_uri import IceUri, parse_uri
    from turnserver.client.preflight import as_json, as_table, load_ice_servers, run
    from turnserver.ops.http.credentials import mint

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
