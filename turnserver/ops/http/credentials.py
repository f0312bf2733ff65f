"""Time-limited TURN credentials (TURN REST API shared secrets) and the JSON shapes
they are handed out in: Twilio's Tokens resource, the TURN REST API draft
(draft-uberti-behave-turn-rest) and a browser RTCConfiguration.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from turnserver.core.auth import rest_password

_TTL = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """'600', '10m', '1h', '1d' -> seconds; ValueError otherwise."""
    match = _TTL.match(text)
    if not match:
        raise ValueError(f"bad ttl {text!r}: use seconds or a number with s, m, h or d")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("ttl must be positive")
    return seconds


@dataclass(frozen=True, slots=True)
class MintedCredential:
    """A username/password pair valid until `expires` (Unix time)."""

    username: str
    password: str
    ttl: int
    expires: int


def mint(secret: str, user: str, ttl: int, now: float) -> MintedCredential:
    """`<expiry>:<user>` signed with the shared secret."""
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    expires = int(now) + ttl
    username = f"{expires}:{user}" if user else str(expires)
    return MintedCredential(username, rest_password(secret, username), ttl, expires)


@dataclass(frozen=True, slots=True)
class ServerUris:
    """The STUN and TURN URIs (RFC 7064/7065) clients should use for this deployment."""

    stun: tuple[str, ...]
    turn: tuple[str, ...]  # turn: and turns:


def twilio_token(
    cred: MintedCredential, uris: ServerUris, account_sid: str, now: float
) -> dict[str, Any]:
    """Twilio's Tokens resource: the keys and value types Twilio answers with."""
    created = email.utils.format_datetime(datetime.fromtimestamp(int(now), UTC))
    servers: list[dict[str, str]] = [{"url": u, "urls": u} for u in uris.stun]
    servers += [
        {"url": u, "urls": u, "username": cred.username, "credential": cred.password}
        for u in uris.turn
    ]
    return {
        "account_sid": account_sid,
        "date_created": created,
        "date_updated": created,
        "ice_servers": servers,
        "password": cred.password,
        "ttl": str(cred.ttl),
        "username": cred.username,
    }


def rest_api_credential(cred: MintedCredential, uris: ServerUris) -> dict[str, Any]:
    """The TURN REST API draft's response: username, password, ttl, uris."""
    return {
        "username": cred.username,
        "password": cred.password,
        "ttl": cred.ttl,
        "uris": list(uris.turn),
    }


def ice_servers_config(
    cred: MintedCredential, uris: ServerUris, relay_only: bool
) -> dict[str, Any]:
    """An RTCConfiguration a browser can pass to RTCPeerConnection as is."""
    servers: list[dict[str, Any]] = []
    if uris.stun:
        servers.append({"urls": list(uris.stun)})
    servers.append(
        {"urls": list(uris.turn), "username": cred.username, "credential": cred.password}
    )
    return {"iceServers": servers, "iceTransportPolicy": "relay" if relay_only else "all"}
