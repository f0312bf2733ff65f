"""A small asyncio TURN client (RFC 8656) on our codec, for the self-probe and preflight.

UDP requests are retransmitted (RFC 8489 §6.2.1, RTO 500 ms doubling); TCP and TLS use the
stream framer. 401 and 438 challenges are answered once with the realm and nonce given.
Failures raise TurnClientError carrying the server's error code and reason.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any, cast

from turnserver.stun import (
    Attr,
    MessageClass,
    Method,
    PasswordAlgorithm,
    StunDecodeError,
    StunMessage,
    decode_channel_data,
    decode_message,
    encode_channel_data,
    encode_message,
    long_term_key,
    userhash,
)
from turnserver.stun.attributes import Address
from turnserver.stun.framing import StreamFramer

Attributes = Sequence[tuple[int, Any]]


class TurnClientError(Exception):
    """A request failed: the STUN error code (None for timeouts and network errors)."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class _ClientProtocol(asyncio.Protocol, asyncio.DatagramProtocol):
    def __init__(self, client: TurnClient) -> None:
        self.client = client
        self.framer = StreamFramer()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client._on_frame(data)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.framer.feed(data)
        except StunDecodeError as exc:
            self.client._fail_all(TurnClientError(f"server sent garbage: {exc}"))
            return
        for frame in frames:
            self.client._on_frame(frame)

    def error_received(self, exc: Exception) -> None:
        self.client._fail_all(TurnClientError(f"network error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._fail_all(TurnClientError("connection closed by the server"))


class TurnClient:
    """One TURN client 5-tuple to one server."""

    def __init__(self, transport_name: str, username: str, password: str, timeout: float) -> None:
        self.transport_name = transport_name
        self.username = username
        self.password = password
        self.timeout = timeout
        self.realm: str | None = None
        self.nonce: str | None = None
        # RFC 8489 §9.2: use a SHA-256 key and MESSAGE-INTEGRITY-SHA256 when the server
        # offers it, and send USERHASH instead of USERNAME (username anonymity)
        self.sha256 = False
        self.anonymous = False
        self.offered: list[tuple[int, bytes]] | None = None  # PASSWORD-ALGORITHMS seen
        self._transport: asyncio.BaseTransport | None = None
        self._pending: dict[bytes, asyncio.Future[StunMessage]] = {}
        self.data: asyncio.Queue[tuple[Address | int, bytes]] = asyncio.Queue()
        self.indications: asyncio.Queue[StunMessage] = asyncio.Queue()
        self.local: Address = ("", 0)

    @classmethod
    async def connect(
        cls,
        transport_name: str,
        server: Address,
        username: str = "",
        password: str = "",
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 5.0,
        local: Address | None = None,
        preamble: Callable[[Address], bytes] | None = None,
    ) -> TurnClient:
        """Open the client side of a udp, tcp or tls 5-tuple. Over tcp and tls,
        `preamble(local address)` is written first (before any TLS)."""
        client = cls(transport_name, username, password, timeout)
        loop = asyncio.get_running_loop()
        transport: asyncio.BaseTransport
        try:
            if transport_name == "udp":
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _ClientProtocol(client), remote_addr=server, local_addr=local
                )
            else:
                ctx = ssl_context if transport_name == "tls" else None
                if transport_name == "tls" and ctx is None:
                    ctx = ssl.create_default_context()
                sock = None
                if preamble is not None:  # e.g. a PROXY header, before TLS begins
                    sock = await _connected_socket(server, local, preamble, timeout)

                def factory() -> _ClientProtocol:
                    return _ClientProtocol(client)

                hostname = server_hostname if ctx else None
                if sock is None:
                    opening = loop.create_connection(
                        factory,
                        server[0],
                        server[1],
                        ssl=ctx,
                        server_hostname=hostname,
                        local_addr=local,
                    )
                else:
                    opening = loop.create_connection(
                        factory,
                        sock=sock,
                        ssl=ctx,
                        server_hostname=(hostname or server[0]) if ctx else None,
                    )
                try:
                    transport, _ = await asyncio.wait_for(opening, timeout)
                except BaseException:
                    if sock is not None:
                        sock.close()
                    raise
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise TurnClientError(
                f"cannot reach {transport_name} {server[0]}:{server[1]}: "
                f"{exc or type(exc).__name__}"
            ) from exc
        client._transport = transport
        sockname = transport.get_extra_info("sockname")
        client.local = (sockname[0], sockname[1])
        return client

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._fail_all(TurnClientError("client closed"))

    # ---- wire ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise TurnClientError("client closed" if transport is None else "connection closed")
        if self.transport_name == "udp":
            cast(asyncio.DatagramTransport, transport).sendto(data)
        else:
            cast(asyncio.WriteTransport, transport).write(data)

    def _on_frame(self, data: bytes) -> None:
        if data and 0x40 <= data[0] <= 0x7F:
            try:
                number, payload = decode_channel_data(data)
            except StunDecodeError:
                return
            self.data.put_nowait((number, bytes(payload)))
            return
        try:
            msg = decode_message(data)
        except StunDecodeError:
            return
        if msg.message_class in (MessageClass.SUCCESS, MessageClass.ERROR):
            fut = self._pending.pop(msg.transaction_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif msg.method == Method.DATA:
            peer = msg.get(Attr.XOR_PEER_ADDRESS)
            payload = msg.get(Attr.DATA)
            if peer is not None and payload is not None:
                self.data.put_nowait((peer, payload))
            elif msg.has(Attr.ICMP):  # RFC 8656 §11.6: an ICMP error about our data
                self.indications.put_nowait(msg)
        else:
            self.indications.put_nowait(msg)

    def _fail_all(self, exc: TurnClientError) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _transact(self, data: bytes, tid: bytes) -> StunMessage:
        fut: asyncio.Future[StunMessage] = asyncio.get_running_loop().create_future()
        self._pending[tid] = fut
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        rto = 0.5
        try:
            while True:
                self._write(data)
                wait = (
                    min(rto, deadline - loop.time())
                    if self.transport_name == "udp"
                    else (deadline - loop.time())
                )
                if wait <= 0:
                    raise TurnClientError(f"no answer within {self.timeout:g} s")
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), wait)
                except TimeoutError:
                    if loop.time() >= deadline:
                        raise TurnClientError(f"no answer within {self.timeout:g} s") from None
                    rto *= 2
        finally:
            self._pending.pop(tid, None)

    async def request(
        self, method: int, attrs: Attributes = (), *, auth: bool = True
    ) -> StunMessage:
        """Send a request; answer one 401/438 challenge; raise on an error response."""
        for attempt in range(3):
            full = list(attrs)
            key = None
            sha256 = False
            if auth and self.nonce is not None and self.realm is not None:
                if self.anonymous:
                    full.append((Attr.USERHASH, userhash(self.username, self.realm)))
                else:
                    full.append((Attr.USERNAME, self.username))
                full += [(Attr.REALM, self.realm), (Attr.NONCE, self.nonce)]
                offered = self.offered or []
                algorithm = int(PasswordAlgorithm.MD5)
                if self.sha256 and (PasswordAlgorithm.SHA256, b"") in offered:
                    algorithm = PasswordAlgorithm.SHA256
                    sha256 = True
                    full += [
                        (Attr.PASSWORD_ALGORITHMS, offered),  # as offered: bid-down check
                        (Attr.PASSWORD_ALGORITHM, (algorithm, b"")),
                    ]
                key = long_term_key(self.username, self.realm, self.password, algorithm)
            tid = os.urandom(12)
            data = encode_message(
                method,
                MessageClass.REQUEST,
                tid,
                full,
                integrity_key=key,
                fingerprint=True,
                integrity_sha256=sha256,
            )
            resp = await self._transact(data, tid)
            if resp.message_class == MessageClass.SUCCESS:
                return resp
            code, reason = resp.get(Attr.ERROR_CODE) or (0, "")
            retry = auth and attempt < 2 and ((code == 401 and key is None) or code == 438)
            if retry and resp.get(Attr.NONCE):
                self.nonce = resp.get(Attr.NONCE)
                self.realm = resp.get(Attr.REALM) or self.realm
                if resp.has(Attr.PASSWORD_ALGORITHMS):
                    self.offered = resp.get(Attr.PASSWORD_ALGORITHMS)
                continue
            name = Method(method).name if method in Method._value2member_map_ else str(method)
            raise TurnClientError(f"{name} failed: {code} {reason}", code, reason)

        raise TurnClientError("authentication did not converge")

    # ---- TURN operations ------------------------------------------------------------------

    async def binding(self) -> Address:
        """STUN Binding: the server-reflexive address."""
        return (await self.binding_response())[0]

    async def binding_response(self) -> tuple[Address, Address | None]:
        """STUN Binding: (reflexive address, RFC 5780 OTHER-ADDRESS if offered)."""
        resp = await self.request(Method.BINDING, auth=False)
        other: Address | None = resp.get(Attr.OTHER_ADDRESS)
        return self._mapped(resp), other

    @staticmethod
    def _mapped(resp: StunMessage) -> Address:

        mapped: Address | None = resp.get(Attr.XOR_MAPPED_ADDRESS) or resp.get(Attr.MAPPED_ADDRESS)
        if mapped is None:
            raise TurnClientError("Binding response without a mapped address")
        return mapped

    async def allocate(
        self, lifetime: int = 600, *, family: int | None = None, tcp: bool = False
    ) -> tuple[Address, Address | None]:
        """Allocate; returns (relayed address, reflexive address)."""
        attrs: list[tuple[int, Any]] = [
            (Attr.REQUESTED_TRANSPORT, 6 if tcp else 17),
            (Attr.LIFETIME, lifetime),
        ]
        if family is not None:
            attrs.append((Attr.REQUESTED_ADDRESS_FAMILY, family))
        resp = await self.request(Method.ALLOCATE, attrs)
        relayed: Address | None = resp.get(Attr.XOR_RELAYED_ADDRESS)
        if relayed is None:
            raise TurnClientError("Allocate success without XOR-RELAYED-ADDRESS")
        return relayed, resp.get(Attr.XOR_MAPPED_ADDRESS)

    async def create_permission(self, *peers: Address) -> None:
        await self.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, p) for p in peers])

    async def channel_bind(self, number: int, peer: Address) -> None:
        await self.request(
            Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)]
        )

    async def refresh(self, lifetime: int) -> int:
        resp = await self.request(Method.REFRESH, [(Attr.LIFETIME, lifetime)])
        value: int = resp.get(Attr.LIFETIME) or 0
        return value

    def send_channel(self, number: int, payload: bytes) -> None:
        self._write(encode_channel_data(number, payload, pad=self.transport_name != "udp"))

    def send_indication(self, peer: Address, payload: bytes) -> None:
        self._write(
            encode_message(
                Method.SEND,
                MessageClass.INDICATION,
                os.urandom(12),
                [(Attr.XOR_PEER_ADDRESS, peer), (Attr.DATA, payload)],
            )
        )

    async def receive(self, timeout: float) -> tuple[Address | int, bytes]:
        """The next relayed payload: (peer address or channel number, data)."""
        try:
            return await asyncio.wait_for(self.data.get(), timeout)
        except TimeoutError:
            raise TurnClientError(f"no relayed data within {timeout:g} s") from None


async def _connected_socket(
    server: Address, local: Address | None, preamble: Callable[[Address], bytes], timeout: float
) -> socket.socket:
    """A TCP socket connected to `server` that has sent `preamble`."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in server[0] else socket.AF_INET)
    try:
        sock.setblocking(False)
        if local is not None:
            sock.bind(local)
        await asyncio.wait_for(loop.sock_connect(sock, server), timeout)
        name = sock.getsockname()
        await asyncio.wait_for(loop.sock_sendall(sock, preamble((name[0], name[1]))), timeout)
    except BaseException:
        sock.close()
        raise
    return sock
