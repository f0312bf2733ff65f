"""NAT behaviour discovery (RFC 5780 §4.3, §4.4): whether this host's NAT keeps one
mapping for every destination, and which answers its filter lets in, from a STUN
server's OTHER-ADDRESS and CHANGE-REQUEST (ours with --other-address, coturn with two
listening addresses), or a second UDP server address."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from turnserver.client.ice_uri import IceUri
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.stun import (
    Attr,
    MessageClass,
    Method,
    StunDecodeError,
    StunMessage,
    decode_message,
    encode_message,
)
from turnserver.stun.attributes import Address


async def nat_mapping(uris: list[IceUri], timeout: float) -> str:
    """Compare the reflexive address one local socket gets from two server addresses: the
    server's RFC 5780 OTHER-ADDRESS when it offers one, else a second UDP URI's address."""
    targets = list(dict.fromkeys((u.host, u.port) for u in uris if u.transport == "udp"))
    if not targets:
        return "unknown (no UDP server address)"
    try:
        client = await TurnClient.connect("udp", targets[0], timeout=timeout)
        try:
            first, other = await client.binding_response()
            local = client.local
        finally:
            client.close()
        second = other or next((t for t in targets[1:] if t != targets[0]), None)
        if second is None:
            return "unknown (one UDP server address and no RFC 5780 OTHER-ADDRESS)"
        await asyncio.sleep(0.05)
        again = await TurnClient.connect("udp", second, timeout=timeout, local=local)
        try:
            mapped = await again.binding()
        finally:
            again.close()
    except (TurnClientError, OSError):
        return "unknown (binding failed)"
    if mapped == first:
        return "endpoint-independent (direct connections likely work)"
    return "address-dependent or symmetric (direct connections likely fail: TURN needed)"


class _AnySource(asyncio.DatagramProtocol):
    """An unconnected UDP socket: answers may come from any of the server's addresses."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.answers.put_nowait((data, (addr[0], addr[1])))


async def _binding_from_anywhere(
    transport: asyncio.DatagramTransport,
    proto: _AnySource,
    server: Address,
    change: int,
    timeout: float,
) -> tuple[StunMessage, Address] | None:
    """Send a Binding with CHANGE-REQUEST flags; the answer (success or error) and where
    it came from, or None when nothing came back (three tries within the timeout)."""
    tid = os.urandom(12)
    attrs = [(Attr.CHANGE_REQUEST, change)] if change else []
    request = encode_message(Method.BINDING, MessageClass.REQUEST, tid, attrs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        transport.sendto(request, server)
        try:
            data, source = await asyncio.wait_for(
                proto.answers.get(), min(timeout / 3, deadline - loop.time())
            )
        except TimeoutError:
            continue
        try:
            msg = decode_message(data)
        except StunDecodeError:
            continue
        if msg.transaction_id == tid and msg.message_class != MessageClass.REQUEST:
            return msg, source
    return None


def _origin(answer: tuple[StunMessage, Address]) -> Address:
    msg, source = answer
    origin: Address | None = msg.get(Attr.RESPONSE_ORIGIN)
    return origin or source


async def nat_filtering(uris: list[IceUri], timeout: float) -> str:
    """RFC 5780 §4.4: does the NAT let in answers from the server's other IP and port
    (endpoint-independent), from its other port only (address-dependent), or neither
    (address-and-port-dependent)? Needs a server with OTHER-ADDRESS that answers
    CHANGE-REQUEST (ours with --other-address, coturn with two listening IPs)."""
    targets = list(dict.fromkeys((u.host, u.port) for u in uris if u.transport == "udp"))
    if not targets:
        return "unknown (no UDP server address)"
    server = targets[0]
    loop = asyncio.get_running_loop()
    family_any = "::" if ":" in server[0] else "0.0.0.0"
    transport, proto = await loop.create_datagram_endpoint(_AnySource, local_addr=(family_any, 0))
    refused = "unknown (the server does not answer CHANGE-REQUEST)"
    try:
        first = await _binding_from_anywhere(transport, proto, server, 0, timeout)
        if first is None or first[0].message_class != MessageClass.SUCCESS:
            return "unknown (binding failed)"
        if not first[0].has(Attr.OTHER_ADDRESS):
            return "unknown (the server offers no RFC 5780 OTHER-ADDRESS)"
        # change IP and port, then port only: the first answer that gets through says how
        # strict the NAT's filter is (an answer from the same address tells nothing)
        for change, behaviour in ((0x06, "endpoint-independent"), (0x02, "address-dependent")):
            answer = await _binding_from_anywhere(transport, proto, server, change, timeout)
            if answer is None:
                continue
            if answer[0].message_class != MessageClass.SUCCESS:
                return refused
            if _origin(answer) != server:
                return behaviour
        return "address-and-port-dependent"
    finally:
        transport.close()
