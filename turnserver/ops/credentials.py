"""Minting time-limited TURN REST API credentials (draft-uberti-behave-turn-rest)."""

from __future__ import annotations

from dataclasses import dataclass

from turnserver.core.auth import rest_password


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
