"""Test helpers: an in-memory TURN client for the core and fake relay sockets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from turnserver.core.allocation import Allocation
from turnserver.core.auth import Authenticator, Credentials, NonceIssuer, rest_password
from turnserver.core.config import CoreConfig, RelayAddress
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.policy import DefaultPeerPolicy
from turnserver.core.server import TurnServer
from turnserver.stun import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    decode_message,
    encode_message,
    long_term_key,
)
from turnserver.stun.attributes import ATTRIBUTE_CODECS, Address
from turnserver.stun.errors import StunDecodeError

REALM = "example.org"
SECRET = "capsecret"
NOW = 1_800_000_000.0


@dataclass
class FakeRelay:
    address: Address
    sent: list[tuple[bytes, Address]] = field(default_factory=list)
    closed: bool = False

    def sendto(self, data: bytes, addr: Address) -> None:
        self.sent.append((bytes(data), addr))

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeTcpRelay:
    address: Address
    connecting: list[tuple[int, Address]] = field(default_factory=list)
    closed_connections: list[int] = field(default_factory=list)
    closed: bool = False

    def connect(self, connection_id: int, peer: Address) -> None:
        self.connecting.append((connection_id, peer))

    def close_connection(self, connection_id: int) -> None:
        self.closed_connections.append(connection_id)

    def close(self) -> None:
        self.closed = True


class FakeRelayOpener:
    """Hands out FakeRelay sockets; ports in `busy` fail to bind."""

    def __init__(self) -> None:
        self.opened: list[FakeRelay] = []
        self.tcp_opened: list[FakeTcpRelay] = []

        self.busy: set[int] = set()
        self.max_sockets: int | None = None  # like a file descriptor budget

    def has_capacity(self, sockets: int) -> bool:
        return self.max_sockets is None or len(self.live) + sockets <= self.max_sockets

    def port_free(self, host: str, port: int) -> bool:
        return port not in self.busy and all(r.address != (host, port) for r in self.live)

    def open_relay(
        self, allocation: Allocation, host: str, port: int, *, dont_fragment: bool
    ) -> FakeRelay | None:
        if port in self.busy or any(r.address == (host, port) for r in self.live):
            return None  # like bind(): a port in use cannot be bound again

        relay = FakeRelay((host, port))
        self.opened.append(relay)
        return relay

    def open_tcp_relay(self, allocation: Allocation, host: str, port: int) -> FakeTcpRelay | None:
        if port in self.busy:
            return None
        relay = FakeTcpRelay((host, port))
        self.tcp_opened.append(relay)
        return relay

    @property
    def live(self) -> list[FakeRelay]:
        return [r for r in self.opened if not r.closed]


def make_core(**overrides: Any) -> tuple[TurnServer, FakeRelayOpener]:
    relay_addresses = overrides.pop(
        "relay_addresses",
        (RelayAddress("127.0.0.1", "203.0.113.9", 4), RelayAddress("::1", "2001:db8::9", 6)),
    )
    allow_loopback = overrides.pop("allow_loopback", True)
    config = CoreConfig(
        relay_addresses=relay_addresses,
        min_port=50000,
        max_port=50099,
        software="turnserver-test",
        **overrides,
    )
    creds = Credentials.build(REALM, passwords={"alice": "alice-pw"}, secrets=[SECRET, "old"])
    auth = Authenticator(creds, NonceIssuer(b"k" * 32))
    opener = FakeRelayOpener()
    core = TurnServer(config, auth, opener, DefaultPeerPolicy(allow_loopback=allow_loopback))
    return core, opener


def rest_credential(
    user: str = "bob", expires: float = NOW + 3600, secret: str = SECRET
) -> tuple[str, str]:
    username = f"{int(expires)}:{user}"
    return username, rest_password(secret, username)


class CoreClient:
    """Drives a TurnServer like a TURN client would, with no sockets."""

    def __init__(
        self,
        core: TurnServer,
        client: Address = ("192.0.2.50", 40000),
        username: str = "alice",
        password: str = "alice-pw",
        transport: ClientTransport = ClientTransport.UDP,
    ) -> None:
        self.core = core
        self.ft = FiveTuple(client, ("192.0.2.1", 3478), transport)
        self.username = username
        self.password = password
        self.nonce: str | None = None
        self.realm = REALM
        self.now = NOW
        self.last_reply: bytes | None = None  # what the core answered last, as it was

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    def raw(self, data: bytes) -> StunMessage | None:
        out = self.last_reply = self.core.handle_message(data, self.ft, self.now)
        return decode_message(out) if out is not None else None

    def request(
        self,
        method: Method,
        attrs: list[tuple[int, Any]] | None = None,
        *,
        auth: bool = True,
        tid: bytes | None = None,
        fingerprint: bool = False,
    ) -> StunMessage:
        """Send a request; on a 401/438 challenge, retry once with credentials."""
        attrs = list(attrs or [])
        tid = tid or os.urandom(12)
        if auth and self.nonce is None:
            first = self._send(method, attrs, tid, False, fingerprint)
            if first.get(Attr.ERROR_CODE) and first.get(Attr.ERROR_CODE)[0] == 401:
                self.nonce = first.get(Attr.NONCE)
                tid = os.urandom(12)
            else:
                return first
        resp = self._send(method, attrs, tid, auth, fingerprint)
        err = resp.get(Attr.ERROR_CODE)
        if auth and err and err[0] == 438:
            self.nonce = resp.get(Attr.NONCE)
            resp = self._send(method, attrs, os.urandom(12), auth, fingerprint)
        return resp

    def _send(
        self,
        method: Method,
        attrs: list[tuple[int, Any]],
        tid: bytes,
        auth: bool,
        fingerprint: bool,
    ) -> StunMessage:
        full = list(attrs)
        key = None
        if auth:
            full += [
                (Attr.USERNAME, self.username),
                (Attr.REALM, self.realm),
                (Attr.NONCE, self.nonce),
            ]
            key = self.key
        data = encode_message(
            method, MessageClass.REQUEST, tid, full, integrity_key=key, fingerprint=fingerprint
        )
        resp = self.raw(data)
        assert resp is not None
        assert resp.transaction_id == tid
        return resp

    def indication(self, method: Method, attrs: list[tuple[int, Any]]) -> None:
        data = encode_message(method, MessageClass.INDICATION, os.urandom(12), attrs)
        assert self.core.handle_message(data, self.ft, self.now) is None

    def allocate(self, extra: list[tuple[int, Any]] | None = None) -> StunMessage:
        return self.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17), *(extra or [])])


def error_code(msg: StunMessage) -> int | None:
    err = msg.get(Attr.ERROR_CODE)
    return err[0] if err else None


def decode_every_attribute(data: bytes) -> None:
    """Decode a message and each attribute we know; the codec's invariant is that only
    StunDecodeError ever escapes (an attribute's own error is swallowed here)."""
    msg = decode_message(data)
    for attr_type, raw in msg.attributes:
        codec = ATTRIBUTE_CODECS.get(attr_type)
        if codec is not None:
            try:
                codec.decode(raw, msg.transaction_id)
            except StunDecodeError:
                pass
    msg.unknown_required_attributes()
