"""Who an authenticated request is from (core/auth.py decides, core/auth_hook.py for
users only the authorization hook knows)."""

from __future__ import annotations

from dataclasses import dataclass

from turnserver.core.tenants import DEFAULT_TENANT


@dataclass(slots=True)
class Identity:
    """An authenticated request: the STUN username, the quota user and the key."""

    username: str
    user: str
    key: bytes
    expires: float | None  # REST credential expiry, None for static users
    sha256_integrity: bool = False  # answer with MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6)
    internal: bool = False  # the server's own user (the self-probe): no per-user quota
    tenant: str = DEFAULT_TENANT
    # limits the authorization hook gave this user (0: the tenant's or the server's)
    max_allocations: int = 0
    bandwidth: int = 0  # bytes a second per allocation
