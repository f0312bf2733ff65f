"""Long-term credential authentication (RFC 8489 §9.2, RFC 8656 §5).

Stateless nonces (expiry timestamp + HMAC bound to the client IP), static users
(password or precomputed key) and TURN REST API shared secrets
(draft-uberti-behave-turn-rest: password = base64(HMAC-SHA1(secret, username))).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field

from turnserver.core.errors import BadRequest, StaleNonce, Unauthorized
from turnserver.stun.constants import Attr
from turnserver.stun.message import StunMessage, long_term_key, verify_integrity

NONCE_LIFETIME = 600.0


def rest_password(secret: str, username: str) -> str:
    """The TURN REST API password for a username under a shared secret."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def parse_rest_username(username: str) -> tuple[int, str] | None:
    """Return (expiry, user) for `<expiry>:<user>`, `<user>:<expiry>` or a bare expiry."""
    if username.isdigit():
        return int(username), ""
    first, sep, rest = username.partition(":")
    if sep and first.isdigit():
        return int(first), rest
    head, sep, last = username.rpartition(":")
    if sep and last.isdigit():
        return int(last), head
    return None


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who may allocate: realm, static users (name -> key) and REST shared secrets."""

    realm: str
    user_keys: dict[str, bytes] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()

    @staticmethod
    def build(
        realm: str,
        passwords: dict[str, str] | None = None,
        keys: dict[str, bytes] | None = None,
        secrets: tuple[str, ...] | list[str] = (),
    ) -> Credentials:
        """Precompute long-term keys for static users."""
        user_keys = {u: long_term_key(u, realm, p) for u, p in (passwords or {}).items()}
        user_keys.update(keys or {})
        return Credentials(realm, user_keys, tuple(secrets))


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated request: the STUN username, the quota user and the key."""

    username: str
    user: str
    key: bytes
    expires: float | None  # REST credential expiry, None for static users


class NonceIssuer:
    """Stateless nonces: hex expiry + HMAC(key, expiry | client ip) (RFC 8489 §9.2)."""

    def __init__(self, key: bytes, lifetime: float = NONCE_LIFETIME) -> None:
        self._key = key
        self.lifetime = lifetime

    MAC_HEX = 16  # 64 bits: nonces live minutes and are bound to one client IP

    def _mac(self, expiry_hex: str, client_ip: str) -> str:
        msg = f"{expiry_hex}|{client_ip}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[: self.MAC_HEX]

    def sign(self, data: bytes) -> bytes:
        """HMAC-SHA256 with the nonce key (shared by worker processes)."""
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def issue(self, client_ip: str, now: float) -> str:
        """A fresh nonce for this client address."""
        expiry_hex = f"{int(now + self.lifetime):x}"
        return expiry_hex + self._mac(expiry_hex, client_ip)

    def check(self, nonce: str, client_ip: str, now: float) -> bool:
        """True when the nonce is ours, for this client, and not expired."""
        n = self.MAC_HEX
        if len(nonce) <= n or len(nonce) > n + 16:
            return False
        expiry_hex, mac = nonce[:-n], nonce[-n:]

        if not hmac.compare_digest(self._mac(expiry_hex, client_ip), mac):
            return False
        try:
            return int(expiry_hex, 16) > now
        except ValueError:
            return False


class Authenticator:
    """Decides whether a request carries valid long-term credentials."""

    def __init__(self, credentials: Credentials, nonces: NonceIssuer) -> None:
        self.credentials = credentials
        self.nonces = nonces
        # Users of the server itself (the self-probe); kept across config reloads.
        self.internal_keys: dict[str, bytes] = {}
        # REST keys by (secret index, username): HMAC + MD5 once per credential, not per
        # request. Bounded; emptied when full and when the credentials change.
        self._rest_keys: dict[tuple[int, str], bytes] = {}
        self._rest_keys_for: Credentials | None = None

    def _rest_key(self, index: int, secret: str, username: str) -> bytes:
        creds = self.credentials
        if self._rest_keys_for is not creds:
            self._rest_keys = {}
            self._rest_keys_for = creds
        cache_key = (index, username)
        key = self._rest_keys.get(cache_key)
        if key is None:
            if len(self._rest_keys) >= 50_000:
                self._rest_keys.clear()
            key = long_term_key(username, creds.realm, rest_password(secret, username))
            self._rest_keys[cache_key] = key
        return key

    @property
    def realm(self) -> str:
        return self.credentials.realm

    def authenticate(self, msg: StunMessage, client_ip: str, now: float) -> Identity:
        """Return the identity or raise Unauthorized/StaleNonce/BadRequest (RFC 8489 §9.2.4)."""
        if msg.integrity_offset < 0 and msg.integrity_sha256_offset < 0:
            raise Unauthorized("no MESSAGE-INTEGRITY", reason="unauthenticated")
        username = msg.get(Attr.USERNAME)
        realm = msg.get(Attr.REALM)
        nonce = msg.get(Attr.NONCE)
        if username is None or realm is None or nonce is None:
            raise BadRequest("MESSAGE-INTEGRITY without USERNAME, REALM and NONCE")
        if not self.nonces.check(nonce, client_ip, now):
            raise StaleNonce("nonce expired or not ours", reason="stale_nonce")
        creds = self.credentials
        if not hmac.compare_digest(realm.encode(), creds.realm.encode()):
            raise Unauthorized(f"realm {realm!r} is not ours", reason="bad_credentials")
        key = creds.user_keys.get(username) or self.internal_keys.get(username)

        if key is not None:
            if verify_integrity(msg, key):
                return Identity(username, username, key, None)
            raise Unauthorized(f"bad password for user {username!r}", reason="bad_credentials")
        parsed = parse_rest_username(username) if creds.secrets else None
        if parsed is None:
            raise Unauthorized(f"unknown user {username!r}", reason="bad_credentials")
        expiry, user = parsed
        for index, secret in enumerate(creds.secrets):
            rest_key = self._rest_key(index, secret, username)

            if verify_integrity(msg, rest_key):
                if expiry <= now:
                    raise Unauthorized(
                        f"credential {username!r} expired {int(now - expiry)} s ago",
                        reason="expired_credentials",
                    )
                return Identity(username, user or username, rest_key, float(expiry))
        raise Unauthorized(
            f"REST credential {username!r} matches no shared secret", reason="bad_credentials"
        )
