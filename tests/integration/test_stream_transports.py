"""TURN over TCP and TLS: aioice as client, timeouts, framing errors, certificate reload."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import warnings

import pytest
from aioice import turn

from tests.support import Collector, eventually
from tests.support.server import SECRET, EchoProtocol, RunningServer, client_ssl_context
from turnserver.core import events as ev
from turnserver.ops.http.credentials import mint
from turnserver.stun import MessageClass, Method, decode_message, encode_message


async def _relay(server: RunningServer, peer: tuple[str, int], scheme: str, count: int) -> None:
    cred = mint(SECRET, f"aioice-{scheme}", 600, time.time())
    transport, proto = await turn.create_turn_endpoint(
        Collector,
        server_addr=server.address_of(scheme),
        username=cred.username,
        password=cred.password,
        transport="udp" if scheme == "udp" else "tcp",
        ssl=client_ssl_context() if scheme == "tls" else None,
    )
    try:
        for i in range(count):
            payload = f"{scheme} packet {i} ".encode() * (1 + i % 7)  # odd sizes: padding
            transport.sendto(payload, peer)
            assert await asyncio.wait_for(proto.queue.get(), 3) == payload
    finally:
        transport.close()


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
async def test_aioice_over_stream(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol], scheme: str
) -> None:
    await _relay(server, echo_peer[0], scheme, 30)
    # connection closed -> allocation gone
    await eventually(lambda: not server.runtime.core.allocations)
    await eventually(lambda: not server.runtime.stream_connections)


async def test_allocation_dies_with_its_connection(server: RunningServer) -> None:
    """Each TCP connection is its own 5-tuple (RFC 6062 §4.1): close it, lose the allocation."""
    cred = mint(SECRET, "closer", 600, time.time())
    transport, _ = await turn.create_turn_endpoint(
        Collector,
        server_addr=server.address_of("tcp"),
        username=cred.username,
        password=cred.password,
        transport="tcp",
    )
    assert len(server.runtime.core.allocations) == 1
    conn = next(iter(server.runtime.stream_connections.values()))
    assert conn.transport is not None
    conn.transport.abort()  # as if the client vanished
    await eventually(lambda: not server.runtime.core.allocations)
    transport.close()


async def test_stun_binding_over_tcp_and_tls(server: RunningServer) -> None:
    for scheme, ctx in (("tcp", None), ("tls", client_ssl_context())):
        host, port = server.address_of(scheme)
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        if ctx is not None:
            sslobj = writer.get_extra_info("ssl_object")
            assert sslobj.version() in ("TLSv1.2", "TLSv1.3")
        req = encode_message(Method.BINDING, MessageClass.REQUEST, b"x" * 12)
        writer.write(req[:5])
        await writer.drain()
        writer.write(req[5:] + req)  # split across writes, then two back to back
        for _ in range(2):
            head = await asyncio.wait_for(reader.readexactly(20), 3)
            body = await reader.readexactly(int.from_bytes(head[2:4], "big"))
            msg = decode_message(head + body)
            assert msg.message_class == MessageClass.SUCCESS
        writer.close()


async def test_tls_rejects_old_protocols_and_offers_alpn(server: RunningServer) -> None:
    host, port = server.address_of("tls")
    ctx = client_ssl_context()
    ctx.set_alpn_protocols(["stun.turn"])
    _, writer = await asyncio.open_connection(host, port, ssl=ctx)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "stun.turn"
    writer.close()
    # A client that offers only TLS 1.0/1.1 (allowed on its side at security level 0)
    # must be refused by the server.
    old = client_ssl_context()
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)) as info:
        await asyncio.wait_for(asyncio.open_connection(host, port, ssl=old), 5)
    assert "NO_PROTOCOLS_AVAILABLE" not in str(info.value).upper()  # refused by the server


async def test_garbage_on_a_stream_closes_it(server: RunningServer) -> None:
    closed: list[ev.ConnectionClosed] = []
    server.runtime.event_sinks.append(
        lambda e: closed.append(e) if isinstance(e, ev.ConnectionClosed) else None
    )
    host, port = server.address_of("tcp")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\xff\xfe garbage that is neither STUN nor ChannelData")
    assert await asyncio.wait_for(reader.read(100), 3) == b""
    assert closed and closed[0].reason == "framing_error"
    writer.close()


@pytest.mark.server_settings(idle_timeout=2, handshake_timeout=2)
async def test_idle_connections_and_stalled_handshake_time_out(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    loop = asyncio.get_running_loop()
    idle: list[socket.socket] = []
    tcp = server.address_of("tcp")
    for _ in range(200):
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, tcp)
        idle.append(s)
    stalled = socket.socket()
    stalled.setblocking(False)
    await loop.sock_connect(stalled, server.address_of("tls"))  # and never say hello
    try:
        # the handshaking TLS connection counts too (it holds a descriptor)
        await eventually(lambda: len(server.runtime.stream_connections) == 201, timeout=1.5)
        # A well-behaved client keeps relaying meanwhile, over UDP and over TCP
        started = time.monotonic()
        while server.runtime.stream_connections and time.monotonic() - started < 10:
            await _relay(server, echo_peer[0], "udp", 5)
        assert not server.runtime.stream_connections
        for s in [*idle, stalled]:
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, 10), 2)
            except ConnectionResetError:
                data = b""
            assert data == b""  # closed by the server
        await _relay(server, echo_peer[0], "tcp", 5)
    finally:
        for s in [*idle, stalled]:
            s.close()


@pytest.mark.server_settings(idle_timeout=1, handshake_timeout=30)
async def test_connection_closed_mid_handshake_is_released(server: RunningServer) -> None:
    """The sweeper closes a TLS connection whose handshake has not finished (idle, no
    ClientHello): the connection must leave the tables and give its descriptor back,
    though start_tls then ends with neither a transport nor an exception."""
    loop = asyncio.get_running_loop()
    stalled = socket.socket()
    stalled.setblocking(False)
    await loop.sock_connect(stalled, server.address_of("tls"))
    try:
        deadline = time.monotonic() + 5
        while server.runtime.stream_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not server.runtime.stream_connections
        assert not server.runtime.streams_per_ip
    finally:
        stalled.close()
