"""The authorization hook as the core sees it, sans I/O: users the configuration does
not know may be vouched for by an HTTP endpoint (ops/auth/hook.py asks it).

A request from such a user waits (DeferredResponse): the core emits AuthHookNeeded
once per (username, realm) and keeps the request's bytes; when the answer comes,
TurnServer.auth_hook_result caches it and runs the waiting requests again. Answers are
cached, a grant until its expiry (at most the cache TTL), a refusal for the negative
TTL, an unavailable hook for a second (retransmissions get their 401, "authorization
hook unavailable", without asking again). Every table is bounded, whatever usernames clients send.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from turnserver.core.errors import Unauthorized
from turnserver.core.five_tuple import FiveTuple
from turnserver.core.identity import Identity
from turnserver.core.tenants import DEFAULT_TENANT
from turnserver.stun.constants import PasswordAlgorithm
from turnserver.stun.message import StunMessage, verify_integrity

HookKey = tuple[str, str]  # (username, realm)
MAX_PENDING_USERS = 1024  # users being asked about at once; beyond, 500 at once
MAX_WAITING = 8  # requests of one user waiting for the answer (a client's retransmits)
MAX_CACHED = 100_000  # answers remembered; the oldest half goes when full
FAILURE_TTL = 1.0


@dataclass(slots=True)
class HookGrant:
    """The hook's yes: the long-term keys (never logged), until when, and whose."""

    key: bytes = field(repr=False)  # MD5 long-term key
    key_sha256: bytes | None = field(repr=False)  # when the hook gave a password
    until: float  # cache expiry, Unix time
    expires: float | None  # the credential's own expiry (Unix), if the hook gave one
    tenant: str = DEFAULT_TENANT
    max_allocations: int = 0
    bandwidth: int = 0  # bytes a second


class AuthHookPending(Exception):
    """The user is not known yet: the request waits for the hook's answer."""

    def __init__(self, key: HookKey) -> None:
        super().__init__(key[0])
        self.key = key


class HookBook:
    """The core's answers from the hook and the requests waiting for one."""

    def __init__(self) -> None:
        self.granted: dict[HookKey, HookGrant] = {}
        self.refused: dict[HookKey, float] = {}  # until (Unix time)
        self.failed: dict[HookKey, float] = {}
        self.pending: dict[HookKey, list[tuple[FiveTuple, bytes]]] = {}

    def identity(
        self,
        msg: StunMessage,
        username: str,
        realm: str,
        algorithm: int,
        sha256: bool,
        now: float,
    ) -> Identity:
        """The Identity of a user the hook vouched for (raises Unauthorized or
        AuthHookPending)."""
        key = (username, realm)
        grant = self.granted.get(key)
        if grant is not None and grant.until > now:
            use = grant.key_sha256 if algorithm == PasswordAlgorithm.SHA256 else grant.key
            if use is None:
                raise Unauthorized(
                    f"user {username!r} has no SHA-256 key (the hook gave an MD5 key)",
                    reason="bad_credentials",
                )
            if not verify_integrity(msg, use):
                raise Unauthorized(f"bad password for user {username!r}", reason="bad_credentials")
            return Identity(
                username,
                username,
                use,
                grant.expires,
                sha256,
                tenant=grant.tenant,
                max_allocations=grant.max_allocations,
                bandwidth=grant.bandwidth,
            )
        if self.refused.get(key, 0.0) > now:
            raise Unauthorized(f"unknown user {username!r}", reason="bad_credentials")
        if self.failed.get(key, 0.0) > now:
            # 401, not 500: a 500 cannot carry integrity for a user we do not know, and a
            # client drops such an answer (RFC 8489 §9.2.5) and waits out its timers
            raise Unauthorized("the authorization hook did not answer", reason="auth_hook_failed")
        raise AuthHookPending(key)

    def wait(self, key: HookKey, ft: FiveTuple, message: bytes) -> bool:
        """Hold a request until the answer; True when the hook must be asked (the
        first for this user). Raises Unauthorized when too many users wait."""
        waiting = self.pending.get(key)
        if waiting is not None:
            if len(waiting) < MAX_WAITING and (ft, message) not in waiting:
                waiting.append((ft, message))
            return False
        if len(self.pending) >= MAX_PENDING_USERS:
            raise Unauthorized(
                "too many users wait for the authorization hook", reason="auth_hook_busy"
            )
        self.pending[key] = [(ft, message)]
        return True

    def answer(
        self, key: HookKey, grant: HookGrant | None, refused_until: float, now: float
    ) -> list[tuple[FiveTuple, bytes]]:
        """Remember the answer (a grant; a refusal until `refused_until`; neither: the
        hook failed) and return the requests that waited for it."""
        for table in (self.granted, self.refused, self.failed):
            table.pop(key, None)
            if len(table) >= MAX_CACHED:
                for old in list(table)[: MAX_CACHED // 2]:
                    del table[old]
        if grant is not None:
            self.granted[key] = grant
        elif refused_until > now:
            self.refused[key] = refused_until
        else:
            self.failed[key] = now + FAILURE_TTL
        return self.pending.pop(key, [])
