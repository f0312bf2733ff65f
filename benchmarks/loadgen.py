"""Load generator: TURN allocations and ChannelData over UDP, with no asyncio in the way.

Setups run as a pipelined state machine over epoll (401 -> Allocate -> CreatePermission
-> ChannelBind, retransmitting after 1 s); traffic is 160-byte ChannelData carrying a
sequence number and a send timestamp, echoed by a UDP peer, for loss and RTT.
Only loopback (127.0.0.0/8) is used; every loop is bounded in time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from turnserver.stun import (
    Attr,
    MessageClass,
    Method,
    StunDecodeError,
    decode_message,
    encode_message,
    long_term_key,
)
from turnserver.stun.message import hmac_digest, message_type

_next_source = itertools.count()


def next_source() -> str:
    """A loopback address no earlier client of this process used: every client of a run
    comes from its own IP, as on the Internet, so neither server's per-address guards nor
    a reused 5-tuple of an earlier run (437) shape the figures."""
    n = next(_next_source)
    return f"127.{1 + n // 62500}.{(n // 250) % 250}.{n % 250 + 1}"


CHANNEL = 0x4000
PAYLOAD = 160
_STAMP = struct.Struct("!QQ")  # sequence, send time (ns)


def rest_credential(secret: str, user: str) -> tuple[str, str]:
    username = f"{int(time.time()) + 86400}:{user}"
    password = base64.b64encode(
        hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    ).decode()
    return username, password


@dataclass
class Client:
    sock: socket.socket
    username: str
    password: str
    state: str = "challenge"
    tid: bytes = b""
    last: bytes = b""  # the request in flight, resent as is (same transaction id)

    sent_at: float = 0.0
    realm: str = ""
    nonce: str = ""
    relayed: tuple[str, int] | None = None
    key: bytes = b""
    credentials: bytes = b""  # USERNAME, REALM and NONCE, encoded once per nonce

    def learn(self, realm: str, nonce: str) -> None:
        self.realm, self.nonce = realm, nonce
        self.key = long_term_key(self.username, realm, self.password)
        self.credentials = encode_message(
            0,
            0,
            bytes(12),
            [(Attr.USERNAME, self.username), (Attr.REALM, realm), (Attr.NONCE, nonce)],
        )[20:]


_HEADER = struct.Struct("!HHI12s")
_MI_HEAD = struct.pack("!HH", Attr.MESSAGE_INTEGRITY, 20)
_COOKIE = 0x2112A442
_SUCCESS = {message_type(m, MessageClass.SUCCESS) for m in Method}


@dataclass
class SetupResult:
    ready: list[Client] = field(default_factory=list)
    failed: int = 0
    seconds: float = 0.0


class LoadGen:
    """Clients against one TURN server, all on 127.0.0.1."""

    def __init__(self, server: tuple[str, int], secret: str, peer: tuple[str, int]) -> None:
        self.server = server
        self.secret = secret
        self.peer = peer
        self.epoll = select.epoll()
        self.clients: dict[int, Client] = {}

    def close(self) -> None:
        for c in self.clients.values():
            c.sock.close()
        self.clients.clear()
        self.epoll.close()

    def _send(self, c: Client, method: int, attrs: list[tuple[int, object]], auth: bool) -> None:
        c.tid = os.urandom(12)
        full = list(attrs)
        key = None
        if auth:
            full += [(Attr.USERNAME, c.username), (Attr.REALM, c.realm), (Attr.NONCE, c.nonce)]
            key = c.key
        c.last = encode_message(method, MessageClass.REQUEST, c.tid, full, integrity_key=key)
        c.sock.send(c.last)
        c.sent_at = time.monotonic()

    def _templates(self) -> dict[str, tuple[int, bytes]]:
        """Each setup step's message type and attributes before the credentials, encoded
        once: the generator shares the cores with the server, so it does per request only
        what must change (transaction id, MESSAGE-INTEGRITY). An IPv4 peer's XOR-PEER-
        ADDRESS depends on the magic cookie alone, not on the transaction id."""
        assert ":" not in self.peer[0]
        steps = {
            "challenge": (Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)]),
            "allocate": (Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)]),
            "permission": (Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, self.peer)]),
            "bind": (
                Method.CHANNEL_BIND,
                [(Attr.CHANNEL_NUMBER, CHANNEL), (Attr.XOR_PEER_ADDRESS, self.peer)],
            ),
        }
        return {
            state: (
                message_type(method, MessageClass.REQUEST),
                encode_message(method, MessageClass.REQUEST, bytes(12), attrs)[20:],
            )
            for state, (method, attrs) in steps.items()
        }

    def _step(self, c: Client, templates: dict[str, tuple[int, bytes]]) -> None:
        mtype, body = templates[c.state]
        c.tid = tid = os.urandom(12)
        if c.state == "challenge":
            c.last = _HEADER.pack(mtype, len(body), _COOKIE, tid) + body
        else:  # RFC 8489 §14.5: the MAC covers the header with the length up to it
            body += c.credentials
            header = _HEADER.pack(mtype, len(body) + 24, _COOKIE, tid)
            c.last = header + body + _MI_HEAD + hmac_digest(c.key, "sha1", header, body)
        c.sock.send(c.last)
        c.sent_at = time.monotonic()

    def setup(
        self, count: int, *, window: int = 256, timeout: float = 120.0, prefix: str = "bench"
    ) -> SetupResult:
        """Bring `count` clients to a bound channel, `window` in flight at once."""
        result = SetupResult()
        pending: list[Client] = []
        for i in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind((next_source(), 0))
            s.connect(self.server)
            s.setblocking(False)
            user, password = rest_credential(self.secret, f"{prefix}{i}")
            pending.append(Client(s, user, password))
        active: dict[int, Client] = {}
        templates = self._templates()
        started = time.monotonic()
        deadline = started + timeout
        pending.reverse()
        while (pending or active) and time.monotonic() < deadline:
            while pending and len(active) < window:
                c = pending.pop()
                fd = c.sock.fileno()
                active[fd] = c
                self.clients[fd] = c
                self.epoll.register(fd, select.EPOLLIN)
                self._step(c, templates)
            for fd, _ in self.epoll.poll(0.05):
                c = active.get(fd)
                if c is None:
                    continue
                try:
                    data = c.sock.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    continue
                if data[8:20] != c.tid or len(data) < 20:
                    continue
                # a success answer is all the state machine needs to know, except after
                # Allocate (the relayed address); errors are decoded whole
                ok = (data[0] << 8 | data[1]) in _SUCCESS and c.state in ("permission", "bind")
                if not ok:
                    try:
                        msg = decode_message(data)
                    except StunDecodeError:
                        continue
                    err = msg.get(Attr.ERROR_CODE)
                else:
                    err = None
                if c.state == "challenge" or (err and err[0] == 438):
                    c.learn(msg.get(Attr.REALM) or c.realm, msg.get(Attr.NONCE) or c.nonce)
                    c.state = "allocate" if c.state in ("challenge", "allocate") else c.state
                elif err:
                    result.failed += 1
                    del active[fd]
                    continue
                elif c.state == "allocate":
                    c.relayed = msg.get(Attr.XOR_RELAYED_ADDRESS)
                    c.state = "permission"
                elif c.state == "permission":
                    c.state = "bind"
                elif c.state == "bind":
                    c.state = "ready"
                    result.ready.append(c)
                    del active[fd]
                    continue
                self._step(c, templates)
            now = time.monotonic()
            for c in list(active.values()):
                if now - c.sent_at > 1.0:  # retransmit the same request (RFC 8489 §6.2.1)
                    c.sock.send(c.last)
                    c.sent_at = now
        result.failed += len(active) + len(pending)
        result.seconds = time.monotonic() - started
        return result

    def refresh_all(self) -> None:
        """Keep allocations alive (Refresh with the default lifetime), fire and forget."""
        for c in self.clients.values():
            if c.state == "ready":
                try:
                    self._send(c, Method.REFRESH, [(Attr.LIFETIME, 600)], True)
                except OSError:
                    pass

    def traffic(
        self, clients: list[Client], rate: float, seconds: float
    ) -> tuple[int, int, list[float]]:
        """Offer `rate` ChannelData packets/s spread over clients; returns
        (sent, received, rtts in seconds)."""
        header = struct.pack("!HH", CHANNEL, PAYLOAD)
        pad = bytes(PAYLOAD - _STAMP.size)
        fds = {c.sock.fileno(): c for c in clients}
        sent = received = 0
        rtts: list[float] = []
        start = time.monotonic()
        end = start + seconds
        n = len(clients)
        i = 0
        recv_until = end + 1.0
        while True:
            now = time.monotonic()
            if now >= recv_until:
                break
            if now < end:
                due = int((now - start) * rate) - sent
                for _ in range(min(due, 2000)):
                    c = clients[i % n]
                    i += 1
                    try:
                        c.sock.send(header + _STAMP.pack(sent, time.perf_counter_ns()) + pad)
                        sent += 1
                    except OSError:
                        sent += 1
            for fd, _ in self.epoll.poll(0.0005):
                c = fds.get(fd)
                if c is None:
                    continue
                while True:
                    try:
                        data = c.sock.recv(2048)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    if len(data) >= 4 + _STAMP.size and 0x40 <= data[0] <= 0x7F:
                        _, stamp = _STAMP.unpack_from(data, 4)
                        rtts.append((time.perf_counter_ns() - stamp) / 1e9)
                        received += 1
            if now >= end and received >= sent:
                break
        return sent, received, rtts
