"""The banner a developer sees at start with --show-credential: a ready-to-use
credential, how to trust the certificate, the iceServers JSON and the API's URLs."""

from __future__ import annotations

import json
import logging
import os
import resource
import time

from turnserver.io.runtime import ListenAddress, ServerRuntime
from turnserver.ops.config.settings import Settings, preflight_page_enabled
from turnserver.ops.config.uris import ice_uris
from turnserver.ops.dev.selfsigned import spki_sha256
from turnserver.ops.http.credentials import mint

log = logging.getLogger("turnserver")


def credential_banner(settings: Settings, runtime: ServerRuntime, user: str) -> str:
    """A ready-to-use credential and iceServers JSON for a developer."""
    return credential_banner_text(settings, runtime.bound_addresses(), user)


def print_banner(settings: Settings, runtime: ServerRuntime, user: str, api_base: str) -> None:
    """The start-up banner of --show-credential, and the API's URLs when it listens."""
    print(credential_banner(settings, runtime, user), flush=True)
    if not settings.api_listen:
        return
    if settings.accounts:
        sid, token = settings.accounts[0]
        print(
            f"  Tokens API (Twilio-compatible): curl -s -u {sid}:{token} -X POST "
            f"{api_base}/2010-04-01/Accounts/{sid}/Tokens.json",
            flush=True,
        )
    if preflight_page_enabled(settings):
        print(f"  Network test page: {api_base}/preflight", flush=True)
    if settings.api_keys:
        print(
            f"  RTCConfiguration: curl -s '{api_base}/api/v1/ice-servers?"
            f"username=dev&policy=relay&key={settings.api_keys[0]}'",
            flush=True,
        )


def credential_banner_text(settings: Settings, listen: list[ListenAddress], user: str) -> str:
    """The banner for these listeners."""
    urls = ice_uris(settings, listen)
    lines = []
    if settings.secrets:
        cred = mint(settings.secrets[0], user, 86400, time.time())
        username, password = cred.username, cred.password
        note = "valid for 24 h, minted from the shared secret"
    else:
        first = settings.users[0]
        username, password = first.name, first.password or "<precomputed key>"
        note = "static user"
    ice = {
        "iceServers": [{"urls": urls, "username": username, "credential": password}],
        "iceTransportPolicy": "relay",
    }
    lines.append(f"TURN server ready on {', '.join(str(s) for s in listen)}")
    lines.append(f"  realm:    {settings.realm}")
    lines.append(f"  username: {username}")
    lines.append(f"  password: {password}   ({note})")
    if settings.cert_file and any(s.scheme == "tls" for s in listen):
        cert = os.path.abspath(settings.cert_file)
        lines.append(f"  TLS certificate: {cert}")
        lines.append("    If it is self-signed, clients must trust it: start Chromium with")
        lines.append(f"    --ignore-certificate-errors-spki-list={spki_sha256(settings.cert_file)}")
        lines.append(
            f"    or install it system-wide: sudo cp {cert} "
            "/usr/local/share/ca-certificates/turnserver.crt && sudo update-ca-certificates"
        )
    lines.append("  RTCPeerConnection config:")
    lines.append("  " + json.dumps(ice))
    return "\n".join(lines)


def log_limits(rt: ServerRuntime) -> None:
    """Say at start what this process will hold (the limits in force, for the operator)."""
    limits = rt.limits()
    budget = limits.pop("descriptors")
    log.info(
        "limits: descriptor budget %d (RLIMIT_NOFILE %d less a reserve); %s",
        budget,
        resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        ", ".join(f"{name} {value or 'unlimited'}" for name, value in limits.items()),
    )
