"""Long-term credential authentication (RFC 8489 §9.2, RFC 8656 §5).

Stateless nonces (expiry timestamp + HMAC bound to the client IP), static users
(password or precomputed key) and TURN REST API shared secrets
(draft-uberti-behave-turn-rest: password = base64(HMAC-SHA1(secret, username))).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass, field

from turnserver.core.auth_hook import HookBook
from turnserver.core.errors import BadRequest, StaleNonce, Unauthorized
from turnserver.core.identity import Identity
from turnserver.core.tenants import DEFAULT_TENANT
from turnserver.stun.constants import Attr, PasswordAlgorithm
from turnserver.stun.message import (
    StunMessage,
    hmac_digest,
    long_term_key,
    userhash,
    verify_integrity,
)

NONCE_LIFETIME = 600.0
NO_INTEGRITY = "no MESSAGE-INTEGRITY"  # the detail of the first 401 of every allocation
# RFC 8489 §9.2: every nonce starts with the nonce cookie and the 24-bit security
# feature set, base64: 0x000003 = password algorithms (bit 0) and username anonymity
# (bit 1), bits counted from the right (erratum 6290). A client that changes them to
# bid us down no longer holds one of our nonces (438).
NONCE_COOKIE = "obMatJos2AAAD"
# PASSWORD-ALGORITHMS offered in every 401, in order of preference (RFC 8489 §14.11)
OFFERED_ALGORITHMS: list[tuple[int, bytes]] = [
    (PasswordAlgorithm.SHA256, b""),
    (PasswordAlgorithm.MD5, b""),
]


def rest_password(secret: str, username: str) -> str:
    """The TURN REST API password for a username under a shared secret."""
    mac = hmac_digest(secret.encode(), "sha1", username.encode())
    return base64.b64encode(mac).decode()


REST_USERNAME_FORMATS = ("auto", "expiry-first", "user-first")


def ascii_int(text: str, digits: int = 12) -> int | None:
    """The value of 1 to `digits` ASCII digits, else None (str.isdigit() takes '²' and
    '٣', which int() then refuses or reads as a digit of another script)."""
    if 0 < len(text) <= digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def parse_rest_username(username: str, order: str = "auto") -> tuple[int, str] | None:
    """(expiry, user) of a TURN REST username: `<expiry>:<user>` (expiry-first, coturn's
    and what `turnserver mint` makes), `<user>:<expiry>` (user-first) or a bare expiry.
    With "auto" both orders are read; when both ends are numbers (a numeric user), the
    earlier of the two is the expiry: reading the other order can never make an expired
    credential valid."""
    bare = ascii_int(username)
    if bare is not None:
        return bare, ""
    first, sep, rest = username.partition(":")
    head, _, last = username.rpartition(":")
    if not sep:
        return None
    leading = ascii_int(first) if order != "user-first" else None
    trailing = ascii_int(last) if order != "expiry-first" else None
    if leading is not None and trailing is not None:
        return (leading, rest) if leading <= trailing else (trailing, head)
    if leading is not None:
        return leading, rest
    if trailing is not None:
        return trailing, head
    return None


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who may allocate: realm, static users (name -> key) and REST shared secrets."""

    realm: str
    user_keys: dict[str, bytes] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    # SHA-256 keys exist for users configured with a password (not a precomputed key)
    user_keys_sha256: dict[str, bytes] = field(default_factory=dict)
    userhashes: dict[bytes, str] = field(default_factory=dict)  # USERHASH -> user
    rest_order: str = "auto"  # REST_USERNAME_FORMATS (parse_rest_username)
    tenant: str = DEFAULT_TENANT  # whose credentials these are (core/tenants.py)

    @staticmethod
    def build(
        realm: str,
        passwords: dict[str, str] | None = None,
        keys: dict[str, bytes] | None = None,
        secrets: tuple[str, ...] | list[str] = (),
        rest_order: str = "auto",
        tenant: str = DEFAULT_TENANT,
    ) -> Credentials:
        """Precompute long-term keys for static users."""
        passwords = passwords or {}
        user_keys = {u: long_term_key(u, realm, p) for u, p in passwords.items()}
        user_keys.update(keys or {})
        sha256 = {
            u: long_term_key(u, realm, p, PasswordAlgorithm.SHA256) for u, p in passwords.items()
        }
        hashes = {userhash(u, realm): u for u in user_keys}
        return Credentials(realm, user_keys, tuple(secrets), sha256, hashes, rest_order, tenant)


class NonceIssuer:
    """Stateless nonces: hex expiry + HMAC(key, expiry | client ip) (RFC 8489 §9.2)."""

    def __init__(self, key: bytes, lifetime: float = NONCE_LIFETIME) -> None:
        self._key = key
        self.lifetime = lifetime
        # nonces already checked: nonce -> (client ip, expiry). A client sends the same
        # nonce with every request for minutes; it is decoded and MACed once.
        self._checked: dict[str, tuple[str, int]] = {}

    MAC_BYTES = 8  # 64 bits: nonces live minutes and are bound to one client IP

    def _mac(self, expiry: bytes, client_ip: str) -> bytes:
        return hmac_digest(self._key, "sha256", expiry, b"|", client_ip.encode())[: self.MAC_BYTES]

    def sign(self, data: bytes) -> bytes:
        """HMAC-SHA256 with the nonce key (shared by worker processes)."""
        return hmac_digest(self._key, "sha256", data)

    def issue(self, client_ip: str, now: float) -> str:
        """A fresh nonce for this client address: the cookie, then base64url of the
        expiry (4 bytes) and the MAC (8 bytes): 29 characters in all."""
        expiry = int(now + self.lifetime).to_bytes(4, "big")
        raw = expiry + self._mac(expiry, client_ip)
        return NONCE_COOKIE + base64.urlsafe_b64encode(raw).decode()

    def expiry(self, nonce: str) -> int:
        """When a nonce that passed check() expires (0: not remembered)."""
        known = self._checked.get(nonce)
        return known[1] if known is not None else 0

    def check(self, nonce: str, client_ip: str, now: float) -> bool:
        """True when the nonce is ours, for this client, and not expired."""
        known = self._checked.get(nonce)
        if known is not None:
            return known[0] == client_ip and known[1] > now
        if len(nonce) != len(NONCE_COOKIE) + 16 or not nonce.startswith(NONCE_COOKIE):
            return False
        try:
            raw = base64.urlsafe_b64decode(nonce[len(NONCE_COOKIE) :])
        except (ValueError, binascii.Error):
            return False
        expiry, mac = raw[:4], raw[4:]
        if not hmac.compare_digest(self._mac(expiry, client_ip), mac):
            return False
        expires = int.from_bytes(expiry, "big")
        if len(self._checked) >= 20_000:  # only genuine nonces get here; still bounded
            self._checked.clear()
        self._checked[nonce] = (client_ip, expires)
        return expires > now


class Authenticator:
    """Decides whether a request carries valid long-term credentials, and whose
    (tenant) they are."""

    def __init__(
        self,
        credentials: Credentials,
        nonces: NonceIssuer,
        tenants: tuple[Credentials, ...] = (),
    ) -> None:
        self.nonces = nonces
        # Users of the server itself (the self-probe); kept across config reloads.
        self.internal_keys: dict[str, bytes] = {}
        # Users the authorization hook vouched for (core/auth_hook.py); None: no hook
        self.hook: HookBook | None = None
        # REST keys by (realm, tenant, secret index and algorithm, username): HMAC + MD5
        # once per credential, not per request. Bounded; emptied when full and when the
        # credentials change.
        self._rest_keys: dict[tuple[str, str, int, str], bytes] = {}
        # Credentials that verified: (raw USERNAME, USERHASH, REALM, NONCE, client ip) ->
        # (identity, nonce expiry). Every request of an allocation repeats them; decoding,
        # the nonce and realm checks and the key lookup cost most of a request's cost
        # (benchmarks/README.md).
        # Only successes get in; the MAC and both expiries are checked on every request.
        self._verified: dict[tuple[bytes | str | None, ...], tuple[Identity, int]] = {}
        self.configure(credentials, tenants)

    def configure(self, credentials: Credentials, tenants: tuple[Credentials, ...] = ()) -> None:
        """The credentials of the implicit tenant and of the configured tenants (start,
        SIGHUP). Each tenant's credentials are `tenants` twice: under its own realm, and
        under the server's realm, which every 401 names (a WebRTC client answers with
        the realm it was given): there the user, or the secret that verifies, says whose
        request it is."""
        self._credentials = credentials
        self.tenant_credentials = tenants
        own = [credentials]
        realms: dict[str, tuple[Credentials, ...]] = {}
        for creds in tenants:
            if creds.realm == credentials.realm:
                own.append(creds)
            else:
                realms[creds.realm] = (creds,)
        realms[credentials.realm] = tuple(own)
        self.realms = realms
        self._rest_keys = {}
        self._verified = {}

    @property
    def credentials(self) -> Credentials:
        """The implicit tenant's credentials (the server's realm)."""
        return self._credentials

    @credentials.setter
    def credentials(self, credentials: Credentials) -> None:
        self.configure(credentials, ())

    def _rest_key(
        self, creds: Credentials, index: int, secret: str, username: str, algorithm: int
    ) -> bytes:
        cache_key = (creds.realm, creds.tenant, index * 4 + algorithm, username)
        key = self._rest_keys.get(cache_key)
        if key is None:
            if len(self._rest_keys) >= 50_000:
                self._rest_keys.clear()
            password = rest_password(secret, username)
            key = long_term_key(username, creds.realm, password, algorithm)
            self._rest_keys[cache_key] = key
        return key

    def realm_for(self, msg: StunMessage) -> str:
        """The realm a 401 or 438 names: the request's own when it is one of ours (a
        client configured with a tenant's realm keeps it), else the server's."""
        realm = msg.get(Attr.REALM)
        if realm is not None and realm in self.realms:
            return str(realm)
        return self._credentials.realm

    @staticmethod
    def password_algorithm(msg: StunMessage) -> int:
        """RFC 8489 §9.2.4 bid-down protection: neither attribute means MD5; otherwise
        both, PASSWORD-ALGORITHMS exactly as we offered it, and a choice from it."""
        has_list = msg.has(Attr.PASSWORD_ALGORITHMS)
        has_choice = msg.has(Attr.PASSWORD_ALGORITHM)
        if not has_list and not has_choice:
            return PasswordAlgorithm.MD5
        if not (has_list and has_choice):
            raise BadRequest("PASSWORD-ALGORITHM and PASSWORD-ALGORITHMS go together")
        offered = msg.get(Attr.PASSWORD_ALGORITHMS)
        chosen = msg.get(Attr.PASSWORD_ALGORITHM)
        if offered != OFFERED_ALGORITHMS:
            raise BadRequest("PASSWORD-ALGORITHMS differs from what we offered (bid-down?)")
        if chosen not in offered:
            raise BadRequest("PASSWORD-ALGORITHM is not one of PASSWORD-ALGORITHMS")
        algorithm: int = chosen[0]
        return algorithm

    @property
    def realm(self) -> str:
        return self.credentials.realm

    def authenticate(self, msg: StunMessage, client_ip: str, now: float) -> Identity:
        """Return the identity or raise Unauthorized/StaleNonce/BadRequest (RFC 8489 §9.2.4)."""
        if msg.integrity_offset < 0 and msg.integrity_sha256_offset < 0:
            raise Unauthorized(NO_INTEGRITY, reason="unauthenticated")
        first = msg.first
        cacheable = (
            msg.integrity_sha256_offset < 0
            and Attr.PASSWORD_ALGORITHM not in first
            and Attr.PASSWORD_ALGORITHMS not in first
        )  # MD5 key, SHA-1 MAC: what every TURN client sends
        if cacheable:
            cache_key = (
                first.get(Attr.USERNAME),
                first.get(Attr.USERHASH),
                first.get(Attr.REALM),
                first.get(Attr.NONCE),
                client_ip,
            )
            known = self._verified.get(cache_key)
            if known is not None:
                identity, nonce_expires = known
                if (
                    nonce_expires > now
                    and (identity.expires is None or identity.expires > now)
                    and verify_integrity(msg, identity.key)
                ):
                    return identity
                # else the full checks below say what is wrong
        identity = self._authenticate(msg, client_ip, now)
        if cacheable and not identity.internal:
            if len(self._verified) >= 20_000:
                self._verified = {}
            nonce_expires = self.nonces.expiry(msg.get(Attr.NONCE))
            if nonce_expires:
                self._verified[cache_key] = (identity, nonce_expires)
        return identity

    def _authenticate(self, msg: StunMessage, client_ip: str, now: float) -> Identity:
        username = msg.get(Attr.USERNAME)
        hashed = msg.get(Attr.USERHASH) if username is None else None
        realm = msg.get(Attr.REALM)
        nonce = msg.get(Attr.NONCE)
        if (username is None and hashed is None) or realm is None or nonce is None:
            raise BadRequest("MESSAGE-INTEGRITY without USERNAME (or USERHASH), REALM and NONCE")
        if not self.nonces.check(nonce, client_ip, now):
            raise StaleNonce("nonce expired or not ours", reason="stale_nonce")
        candidates = self.realms.get(realm)
        if candidates is None:
            raise Unauthorized(f"realm {realm!r} is not ours", reason="bad_credentials")
        algorithm = self.password_algorithm(msg)
        sha256 = msg.integrity_sha256_offset >= 0
        if username is None:
            # RFC 8489 §14.4 username anonymity: static users only (REST usernames carry
            # an expiry and cannot be enumerated, so their hashes cannot be looked up)
            for creds in candidates:
                username = creds.userhashes.get(bytes(hashed or b""))
                if username is not None:
                    break
            if username is None:
                raise Unauthorized("unknown USERHASH", reason="bad_credentials")
        for creds in candidates:  # static users: a name names one tenant
            if username in creds.user_keys:
                return self._static(msg, creds, username, algorithm, sha256)
        if candidates[0] is self._credentials and algorithm == PasswordAlgorithm.MD5:
            key = self.internal_keys.get(username)
            if key is not None:
                if verify_integrity(msg, key):
                    return Identity(username, username, key, None, sha256, True)
                raise Unauthorized(f"bad password for user {username!r}", reason="bad_credentials")
        rest_user = False
        for creds in candidates:
            parsed = parse_rest_username(username, creds.rest_order) if creds.secrets else None
            if parsed is None:
                continue
            rest_user = True
            expiry, user = parsed
            for index, secret in enumerate(creds.secrets):
                rest_key = self._rest_key(creds, index, secret, username, algorithm)
                if verify_integrity(msg, rest_key):
                    if expiry <= now:
                        raise Unauthorized(
                            f"credential {username!r} expired {int(now - expiry)} s ago",
                            reason="expired_credentials",
                        )
                    return Identity(
                        username,
                        user or username,
                        rest_key,
                        float(expiry),
                        sha256,
                        tenant=creds.tenant,
                    )
        if self.hook is not None:  # a user we do not know: the authorization hook's
            return self.hook.identity(msg, username, str(realm), algorithm, sha256, now)
        if rest_user:
            raise Unauthorized(
                f"REST credential {username!r} matches no shared secret", reason="bad_credentials"
            )
        raise Unauthorized(f"unknown user {username!r}", reason="bad_credentials")

    @staticmethod
    def _static(
        msg: StunMessage, creds: Credentials, username: str, algorithm: int, sha256: bool
    ) -> Identity:
        if algorithm == PasswordAlgorithm.SHA256:
            key = creds.user_keys_sha256.get(username)
            if key is None:
                raise Unauthorized(
                    f"user {username!r} has no SHA-256 key (configured as an MD5 key)",
                    reason="bad_credentials",
                )
        else:
            key = creds.user_keys[username]
        if verify_integrity(msg, key):
            return Identity(username, username, key, None, sha256, tenant=creds.tenant)
        raise Unauthorized(f"bad password for user {username!r}", reason="bad_credentials")
