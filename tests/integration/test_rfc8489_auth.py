"""RFC 8489 §9.2 long-term credentials, the full set: the nonce cookie with security
feature bits, PASSWORD-ALGORITHMS in 401s, SHA-256 keys, MESSAGE-INTEGRITY-SHA256 both
ways, USERHASH for static users, and bid-down protection. Clients that know none of it
keep working (the uclient, aioice and Chromium tests elsewhere)."""

from __future__ import annotations

import hmac
import os
import re
import struct
import time
from pathlib import Path

import pytest

from tests.support.core_client import REALM, CoreClient, error_code, make_core, rest_credential
from tests.support.server import SECRET, RunningServer
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.core.auth import NONCE_COOKIE, OFFERED_ALGORITHMS
from turnserver.ops.http.credentials import mint
from turnserver.stun import (
    Attr,
    MessageClass,
    Method,
    PasswordAlgorithm,
    decode_message,
    encode_message,
    long_term_key,
    userhash,
    verify_integrity,
)

MATRIX = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"  # RFC 8489 Appendix B.1 username


def test_rfc8489_b1_vector() -> None:
    """Appendix B.1: USERHASH and the SHA-256 key match. The published HMAC was computed
    with the header's length field 156 (0x9c), although the attributes take 136 bytes: the
    vector's known erratum; with that length our key reproduces the published MAC."""
    text = (Path(__file__).parent.parent / "data" / "rfc8489-b1.txt").read_text()
    data = bytes(int(x, 16) for x in re.findall(r"0x([0-9a-f]{2})", text))
    assert struct.unpack_from("!H", data, 2)[0] == 156 and len(data) - 20 == 136
    fixed = data[:2] + struct.pack("!H", 136) + data[4:]
    msg = decode_message(fixed)
    assert msg.get(Attr.USERHASH) == userhash(MATRIX, "example.org")
    assert msg.get(Attr.NONCE).startswith("obMatJos2")
    key = long_term_key(MATRIX, "example.org", "TheMatrIX", PasswordAlgorithm.SHA256)
    offset = msg.integrity_sha256_offset
    published = fixed[offset + 4 : offset + 36]
    assert hmac.digest(key, data[:offset], "sha256") == published  # length 156, as published
    # Our own encoding with the same key round-trips through verification
    ours = encode_message(
        Method.BINDING,
        MessageClass.REQUEST,
        fixed[8:20],
        [(Attr.USERHASH, userhash(MATRIX, "example.org")), (Attr.REALM, "example.org")],
        integrity_key=key,
        integrity_sha256=True,
    )
    assert verify_integrity(decode_message(ours), key)


def test_password_algorithm_codecs_round_trip() -> None:
    data = encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        os.urandom(12),
        [
            (Attr.PASSWORD_ALGORITHMS, OFFERED_ALGORITHMS),
            (Attr.PASSWORD_ALGORITHM, (PasswordAlgorithm.SHA256, b"")),
        ],
    )
    msg = decode_message(data)
    assert msg.get(Attr.PASSWORD_ALGORITHMS) == OFFERED_ALGORITHMS
    assert msg.get(Attr.PASSWORD_ALGORITHM) == (PasswordAlgorithm.SHA256, b"")


def _challenge(c: CoreClient) -> tuple[str, list[tuple[int, bytes]]]:
    first = c._send(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)], os.urandom(12), False, False)
    assert error_code(first) == 401
    nonce = first.get(Attr.NONCE)
    assert nonce.startswith(NONCE_COOKIE)  # security features: algorithms + anonymity
    return nonce, first.get(Attr.PASSWORD_ALGORITHMS)


def _sha256_allocate(
    c: CoreClient, nonce: str, offered: object, *, anonymous: bool = False, chosen: int = 2
) -> object:
    who = (Attr.USERHASH, userhash(c.username, REALM)) if anonymous else (Attr.USERNAME, c.username)
    attrs = [
        (Attr.REQUESTED_TRANSPORT, 17),
        who,
        (Attr.REALM, REALM),
        (Attr.NONCE, nonce),
        (Attr.PASSWORD_ALGORITHMS, offered),
        (Attr.PASSWORD_ALGORITHM, (chosen, b"")),
    ]
    algorithm = PasswordAlgorithm.SHA256 if chosen == 2 else PasswordAlgorithm.MD5
    key = long_term_key(c.username, REALM, c.password, algorithm)
    data = encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        os.urandom(12),
        attrs,
        integrity_key=key,
        integrity_sha256=True,
    )
    out = c.core.handle_message(data, c.ft, c.now)
    assert out is not None
    return decode_message(out), key


def test_sha256_static_user_and_userhash() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    nonce, offered = _challenge(c)
    assert offered == OFFERED_ALGORITHMS
    resp, key = _sha256_allocate(c, nonce, offered)
    assert resp.message_class == MessageClass.SUCCESS
    assert resp.integrity_sha256_offset >= 0 and resp.integrity_offset < 0  # answered in kind
    assert verify_integrity(resp, key)
    anon = CoreClient(core, client=("192.0.2.51", 1))
    nonce, offered = _challenge(anon)
    resp, _ = _sha256_allocate(anon, nonce, offered, anonymous=True)
    assert resp.message_class == MessageClass.SUCCESS
    assert core.allocations[anon.ft].username == "alice"


def test_bid_down_is_refused() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    nonce, offered = _challenge(c)
    stripped = [(PasswordAlgorithm.MD5, b"")]  # an attacker removed SHA-256 from the offer
    resp, _ = _sha256_allocate(c, nonce, stripped, chosen=1)
    assert error_code(resp) == 400
    tampered = nonce.replace("AAAD", "AAAA")  # the feature bits changed: not our nonce
    resp, _ = _sha256_allocate(c, tampered, offered)
    assert error_code(resp) == 438
    # Legacy clients (neither attribute) keep MD5 and MESSAGE-INTEGRITY
    assert c.allocate().message_class == MessageClass.SUCCESS


def test_rest_usernames_cannot_be_hashed() -> None:
    """USERHASH works for static users only: a REST username carries its expiry, so the
    server cannot enumerate it to find the hash (the README says so)."""
    core, _ = make_core()
    username, password = rest_credential()  # a valid REST credential, right password
    c = CoreClient(core, username=username, password=password)
    nonce, offered = _challenge(c)
    resp, _ = _sha256_allocate(c, nonce, offered, anonymous=True)
    assert error_code(resp) == 401
    # the control: the same credential with USERNAME (and SHA-256) is accepted
    resp, _ = _sha256_allocate(c, nonce, offered)
    assert resp.message_class == MessageClass.SUCCESS  # type: ignore[attr-defined]


@pytest.mark.parametrize("anonymous", [False, True])
async def test_our_client_speaks_it_over_udp_and_tls(
    server: RunningServer, anonymous: bool
) -> None:
    from tests.support.server import client_ssl_context

    for scheme in ("udp", "tls"):
        if anonymous:
            username, password = "alice", "alice-pw"  # a static user
        else:
            cred = mint(SECRET, "sha-user", 600, time.time())
            username, password = cred.username, cred.password
        c = await TurnClient.connect(
            scheme,
            server.address_of(scheme),
            username,
            password,
            ssl_context=client_ssl_context() if scheme == "tls" else None,
        )
        c.sha256 = True
        c.anonymous = anonymous
        try:
            await c.allocate()
            assert await c.refresh(600) == 600
            alloc = next(iter(server.runtime.core.allocations.values()))
            assert len(alloc.key) == 32  # a SHA-256 key
        except TurnClientError as exc:
            raise AssertionError(f"{scheme}: {exc}") from exc
        finally:
            await c.refresh(0)
            c.close()


def test_checked_nonces_stay_bound_to_their_client_and_expiry() -> None:
    """The nonce check remembers nonces it verified; the memory must not widen them:
    another client IP or a later time than the expiry is still refused."""
    from turnserver.core.auth import NonceIssuer

    issuer = NonceIssuer(b"n" * 32, lifetime=60)
    nonce = issuer.issue("192.0.2.7", 1000.0)
    assert issuer.check(nonce, "192.0.2.7", 1000.0)  # verified, now remembered
    assert issuer.check(nonce, "192.0.2.7", 1030.0)
    assert not issuer.check(nonce, "192.0.2.8", 1030.0)
    assert not issuer.check(nonce, "192.0.2.7", 1061.0)
    assert not issuer.check(nonce[:-1] + ("A" if nonce[-1] != "A" else "B"), "192.0.2.7", 1000.0)


def test_remembered_credentials_are_checked_again_on_every_request() -> None:
    """Credentials that verified once are remembered; the MAC, the nonce's
    and the credential's expiry, and the configured secrets still decide every request."""
    from tests.support.core_client import NOW, SECRET, rest_credential
    from turnserver.core import events as ev
    from turnserver.core.auth import Credentials

    core, _ = make_core()
    user, password = rest_credential("frank", expires=NOW + 100)
    c = CoreClient(core, ("192.0.2.70", 1), user, password)
    assert c.allocate().message_class == MessageClass.SUCCESS
    assert c.request(Method.REFRESH).message_class == MessageClass.SUCCESS  # remembered

    c.password = "not-the-password"  # the same USERNAME, REALM and NONCE, another key
    resp = c.request(Method.REFRESH)
    assert error_code(resp) == 401 and resp.integrity_offset < 0
    c.password = password
    core.drain_events()

    c.now = NOW + 200  # the nonce lives on (600 s), the credential does not
    assert error_code(c.request(Method.REFRESH)) == 401
    failed = [e for e in core.drain_events() if isinstance(e, ev.AuthFailed)]
    assert [e.reason for e in failed] == ["expired_credentials"]

    # a reload that drops the secret: the remembered credential goes with it
    fresh_user, fresh_password = rest_credential("grace", expires=NOW + 3600)
    g = CoreClient(core, ("192.0.2.71", 1), fresh_user, fresh_password)
    g.now = c.now
    assert g.allocate().message_class == MessageClass.SUCCESS
    core.auth.credentials = Credentials.build(REALM, secrets=["rotated"])
    assert error_code(g.request(Method.REFRESH)) == 401
    core.auth.credentials = Credentials.build(REALM, secrets=[SECRET])
    assert g.request(Method.REFRESH).message_class == MessageClass.SUCCESS
