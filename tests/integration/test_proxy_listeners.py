"""PROXY protocol listeners (io/proxy_protocol.py, io/stream.py) with real sockets: the
client a trusted proxy names is the client everywhere; anyone else is refused."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time

import pytest

from tests.support import eventually
from tests.support.server import SECRET, RunningServer, client_ssl_context
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.io.proxy_protocol import encode_v1, encode_v2
from turnserver.io.runtime import ListenAddress
from turnserver.ops.config.values import ConfigError, parse_listen
from turnserver.ops.http.credentials import mint
from turnserver.ops.telemetry.probe import SelfProbe
from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_message

PROXY = "127.0.0.3"  # the trusted proxy's address; clients come from elsewhere
PROXIED = {
    "listen": (
        ListenAddress("udp", "127.0.0.1", 0),
        ListenAddress("tcp", "127.0.0.1", 0, "any"),
        ListenAddress("tls", "127.0.0.1", 0, "v2"),
    ),
    "proxy_trusted": (f"{PROXY}/32",),
    "proxy_header_timeout": 1.0,
}
pytestmark = pytest.mark.server_settings(**PROXIED)


def binding() -> bytes:
    return encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12))


async def mapped_address(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[str, int]:
    writer.write(binding())
    head = await asyncio.wait_for(reader.readexactly(20), 3)
    msg = decode_message(head + await reader.readexactly(int.from_bytes(head[2:4], "big")))
    assert msg.message_class == MessageClass.SUCCESS
    return msg.get(Attr.XOR_MAPPED_ADDRESS)  # type: ignore[no-any-return]


async def open_from(
    source: str, server: tuple[str, int]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*server, local_addr=(source, 0))


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(100), 3) == b""
    except ConnectionResetError:
        return True


async def test_v1_and_v2_headers_name_the_client(server: RunningServer) -> None:
    """The header and the first request in one segment, and the header a byte at a time."""
    tcp = server.address_of("tcp")
    for head, client in (
        (encode_v1(("203.0.113.7", 40001), tcp), ("203.0.113.7", 40001)),
        (encode_v2(("203.0.113.8", 40002), tcp), ("203.0.113.8", 40002)),
        (encode_v2(("2001:db8::9", 40003), ("2001:db8::1", 3478)), ("2001:db8::9", 40003)),
        (encode_v2(("::ffff:192.0.2.5", 40004), ("::1", 3478)), ("192.0.2.5", 40004)),
    ):
        reader, writer = await open_from(PROXY, tcp)
        writer.write(head + binding())  # one write: the request follows the header at once
        resp = await asyncio.wait_for(reader.readexactly(20), 3)
        msg = decode_message(resp + await reader.readexactly(int.from_bytes(resp[2:4], "big")))
        assert msg.get(Attr.XOR_MAPPED_ADDRESS) == client
        assert await mapped_address(reader, writer) == client
        writer.close()
    reader, writer = await open_from(PROXY, tcp)
    for byte in encode_v2(("198.51.100.4", 5000), tcp):
        writer.write(bytes([byte]))
        await writer.drain()
    assert await mapped_address(reader, writer) == ("198.51.100.4", 5000)
    assert not server.runtime.stream_refusals
    writer.close()


async def test_tls_after_the_header_with_the_client_hello_in_the_same_segment(
    server: RunningServer,
) -> None:
    """HAProxy passes TLS through: the PROXY header and the ClientHello usually arrive
    in one read. Nothing of the ClientHello may be lost."""
    tls = server.address_of("tls")
    mapped = await asyncio.to_thread(_tls_binding_behind_header, tls, ("203.0.113.50", 6000))
    assert mapped == ("203.0.113.50", 6000)


def _tls_binding_behind_header(server: tuple[str, int], client: tuple[str, int]) -> object:
    """A blocking TLS client (in a thread) whose first segment is the PROXY header and
    the whole ClientHello; the XOR-MAPPED-ADDRESS of a Binding over that session."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_ssl_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    with socket.create_connection(server, source_address=(PROXY, 0), timeout=5) as sock:
        sock.sendall(encode_v2(client, server) + outgoing.read())
        while True:  # finish the handshake by hand
            data = sock.recv(65536)
            assert data, "the server closed the connection during the handshake"
            incoming.write(data)
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            finally:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
        tls.write(binding())
        sock.sendall(outgoing.read())
        plain = b""
        while len(plain) < 20 or len(plain) < 20 + int.from_bytes(plain[2:4], "big"):
            incoming.write(sock.recv(65536))
            try:
                plain += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
        return decode_message(plain).get(Attr.XOR_MAPPED_ADDRESS)


@pytest.mark.server_settings(**PROXIED, max_stream_connections_per_ip=2)
async def test_allocations_caps_and_limits_see_the_real_client(server: RunningServer) -> None:
    tcp = server.address_of("tcp")
    cred = mint(SECRET, "behind-proxy", 600, time.time())

    def header(client: tuple[str, int]) -> object:
        return lambda _local: encode_v2(client, tcp)

    clients = []
    for port in (7001, 7002):
        c = await TurnClient.connect(
            "tcp",
            tcp,
            cred.username,
            cred.password,
            local=(PROXY, 0),
            preamble=header(("192.0.2.77", port)),  # type: ignore[arg-type]
        )
        await c.allocate()
        clients.append(c)
    allocated = {a.five_tuple.client for a in server.runtime.core.allocations.values()}
    assert allocated == {("192.0.2.77", 7001), ("192.0.2.77", 7002)}
    # stream.max_connections_per_ip = 2 counts the client's address, not the proxy's
    third = await open_from(PROXY, tcp)
    third[1].write(encode_v2(("192.0.2.77", 7003), tcp))
    assert await closed_by_server(third[0])
    assert server.runtime.stream_refusals.get("per_ip_limit") == 1
    other = await open_from(PROXY, tcp)
    other[1].write(encode_v2(("192.0.2.78", 7004), tcp))
    assert await mapped_address(*other) == ("192.0.2.78", 7004)
    other[1].close()
    for c in clients:
        c.close()


async def test_untrusted_sources_are_refused_counted_and_logged_once(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    tcp = server.address_of("tcp")
    caplog.set_level(logging.WARNING, logger="turnserver")
    for _ in range(3):  # from 127.0.0.1, not the trusted 127.0.0.3: with a header...
        reader, writer = await open_from("127.0.0.1", tcp)
        writer.write(encode_v2(("203.0.113.9", 1), tcp) + binding())
        assert await closed_by_server(reader)
        writer.close()
    reader, writer = await open_from("127.0.0.1", tcp)  # ...and without one
    writer.write(binding())
    assert await closed_by_server(reader)
    assert server.runtime.stream_refusals == {"proxy_untrusted": 4}
    lines = [r.getMessage() for r in caplog.records if "PROXY listener" in r.getMessage()]
    assert len(lines) == 1 and "from 127.0.0.1" in lines[0] and "not a trusted proxy" in lines[0]
    assert not server.runtime.proxy_pending and not server.runtime.stream_connections
    assert server.runtime.descriptors.used == 0


async def test_a_trusted_proxy_must_send_a_header_in_time(server: RunningServer) -> None:
    tcp = server.address_of("tcp")
    reader, writer = await open_from(PROXY, tcp)
    writer.write(binding())  # no header: refused on its first byte
    assert await closed_by_server(reader)
    assert server.runtime.stream_refusals == {"proxy_header_invalid": 1}
    reader, writer = await open_from(PROXY, tcp)
    writer.write(encode_v2(("203.0.113.9", 1), tcp)[:10])  # slowloris: never finished
    started = time.monotonic()
    assert await closed_by_server(reader)
    assert time.monotonic() - started >= 0.9  # proxy_header_timeout = 1 s
    await eventually(lambda: server.runtime.stream_refusals.get("proxy_header_timeout") == 1)
    assert not server.runtime.proxy_pending and server.runtime.descriptors.used == 0


async def test_local_command_and_unknown_use_the_proxy_address(server: RunningServer) -> None:
    """proxy-protocol.txt: LOCAL (a proxy's health check) and UNKNOWN mean the
    connection's own endpoints."""
    tcp = server.address_of("tcp")
    for head in (encode_v2(None, None), b"PROXY UNKNOWN\r\n"):
        reader, writer = await open_from(PROXY, tcp)
        writer.write(head)
        host, _ = await mapped_address(reader, writer)
        assert host == PROXY
        writer.close()


async def test_a_tls_listener_takes_only_v2(server: RunningServer) -> None:
    tls = server.address_of("tls")
    reader, writer = await open_from(PROXY, tls)
    writer.write(encode_v1(("203.0.113.9", 1), tls))
    assert await closed_by_server(reader)
    assert server.runtime.stream_refusals == {"proxy_header_invalid": 1}


async def test_the_self_probe_speaks_proxy_from_a_trusted_address(server: RunningServer) -> None:
    probe = SelfProbe(server.runtime, 3600, timeout=3)
    await probe.start()
    try:
        results = await probe.run_once()
    finally:
        await probe.stop()
    assert all(r.ok and r.probed for r in results.values()), results
    assert {r.listener.split(":")[0] for r in results.values()} == {"udp", "tcp", "tls"}


@pytest.mark.server_settings(**{**PROXIED, "proxy_trusted": ("10.1.0.0/16",)})
async def test_the_probe_says_what_it_cannot_reach(server: RunningServer) -> None:
    probe = SelfProbe(server.runtime, 3600, timeout=3)
    await probe.start()
    try:
        results = await probe.run_once()
    finally:
        await probe.stop()
    skipped = [r for r in results.values() if not r.probed]
    assert len(skipped) == 2 and all("stream.proxy_trusted" in r.error for r in skipped)
    assert probe.ready == (True, "")
    with pytest.raises(TurnClientError):  # and indeed: from here, refused
        c = await TurnClient.connect("tcp", server.address_of("tcp"), "u", "p", timeout=2)
        try:
            await c.allocate()
        finally:
            c.close()


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("udp://0.0.0.0:3478?proxy=v2", "no PROXY protocol for UDP"),
        ("tcp://0.0.0.0:3478?proxy=v3", "expected v1, v2 or any"),
        ("tcp://0.0.0.0:3478?proxi=v2", "unknown option 'proxi'"),
        ("tcp://0.0.0.0:3478#x", "trailing parts"),
    ],
)
def test_listener_options_are_checked(uri: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_listen(uri)
    spec = parse_listen("tls://[::]:443?proxy=V2")
    assert (spec.proxy, str(spec)) == ("v2", "tls://[::]:443?proxy=v2")
