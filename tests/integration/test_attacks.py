"""Attacks on real sockets: each attack runs while a good client
relays, and the good client's loss is counted. Everything is on loopback and bounded in
count and time; rates and CPU costs are measured in benchmarks/abuse.py, not here."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from tests.support.procs import run_cli
from tests.support.server import SECRET, EchoProtocol, RunningServer, client_ssl_context
from turnserver.client.turnclient import TurnClient
from turnserver.core import events as ev
from turnserver.ops.http.credentials import mint
from turnserver.stun import MessageClass, Method, encode_message

BROADCAST = ("127.255.255.255", 9)


def _basic(user: str, password: str) -> str:
    import base64

    return (
        "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    )  # sendto() fails with EACCES (no SO_BROADCAST)


async def _client(server: RunningServer, scheme: str, user: str) -> TurnClient:
    cred = mint(SECRET, user, 600, time.time())
    c = await TurnClient.connect(
        scheme,
        server.address_of(scheme),
        cred.username,
        cred.password,
        ssl_context=client_ssl_context() if scheme == "tls" else None,
        timeout=3,
    )
    await c.allocate()
    return c


async def _round_trips(c: TurnClient, peer: tuple[str, int], count: int, tag: bytes) -> int:
    """Send `count` packets through the channel to the echo peer; return how many came back."""
    got = 0
    for i in range(count):
        c.send_channel(0x4001, tag + b"%d" % i)
        try:
            _, data = await c.receive(1.0)
        except Exception:
            continue
        got += data == tag + b"%d" % i
    return got


@pytest.mark.parametrize("scheme", ["udp", "tcp", "tls"])
async def test_send_errors_never_end_an_allocation(
    server: RunningServer,
    echo_peer: tuple[tuple[str, int], EchoProtocol],
    scheme: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="turnserver")
    c = await _client(server, scheme, f"senderr-{scheme}")
    try:
        await c.create_permission(BROADCAST)
        await c.channel_bind(0x4000, BROADCAST)
        await c.channel_bind(0x4001, echo_peer[0])
        for _ in range(50):  # Send indications and ChannelData that cannot be sent
            c.send_indication(BROADCAST, b"x" * 100)
            c.send_channel(0x4000, b"y" * 100)
        assert await _round_trips(c, echo_peer[0], 10, b"ok") == 10
        assert server.runtime.core.stats.dropped_send_error >= 100
        assert len(server.runtime.core.allocations) == 1  # still alive, still relaying
        lines = [r for r in caplog.records if "relay send failed" in r.getMessage()]
        assert len(lines) == 1 and "EACCES" in lines[0].getMessage()
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        c.close()


@pytest.mark.server_settings(log_level="warning")
async def test_attribute_floods_cost_little_and_a_good_client_loses_nothing(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    good = await _client(server, "udp", "good")
    await good.channel_bind(0x4001, echo_peer[0])
    flood_64k = struct.pack("!HH", 0x8123, 0) * 16_371
    flood_mtu = struct.pack("!HH", 0x8123, 0) * 363
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        target = server.address
        for _ in range(100):
            for body in (flood_64k, flood_mtu):
                head = struct.pack("!HHI12s", 0x0003, len(body), 0x2112A442, os.urandom(12))
                sock.sendto(head + body, target)
        assert await _round_trips(good, echo_peer[0], 50, b"good") == 50
        stats = server.runtime.core.stats
        assert stats.dropped_oversized >= 90 and stats.dropped_malformed >= 90
    finally:
        sock.close()
        good.close()


@pytest.mark.server_settings(
    frame_timeout=0.5, first_request_timeout=1.0, idle_timeout=30, max_stream_connections_per_ip=5
)
async def test_slowloris_connections_are_cut_and_capped(server: RunningServer) -> None:
    loop = asyncio.get_running_loop()
    tcp = server.address_of("tcp")
    # A half-sent frame: one byte, then nothing (must not reset the idle timer forever)
    partial = socket.socket()
    partial.setblocking(False)
    await loop.sock_connect(partial, tcp)
    await loop.sock_sendall(partial, b"\x00")
    # A connection that never sends a request at all
    silent = socket.socket()
    silent.setblocking(False)
    await loop.sock_connect(silent, tcp)
    # Over the per-address cap: the sixth is closed at once
    extra = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, tcp)
        extra.append(s)
    try:
        for s in (partial, silent):
            data = await asyncio.wait_for(loop.sock_recv(s, 10), 3)
            assert data == b""
        registry = server.server.metrics.registry
        for reason in ("frame_timeout", "first_request_timeout"):
            value = registry.get_sample_value("turn_connections_closed_total", {"reason": reason})
            assert value is not None and value >= 1.0, reason
        # 1 + 1 + 4 connections from one address: the sixth was refused at once
        assert server.runtime.stream_refusals.get("per_ip_limit", 0) == 1
        ok, body = server.server.health.readiness()
        assert ok and body["checks"]["capacity"]["refused_last_minute"]["per_ip_limit"] == 1
    finally:
        for s in (partial, silent, *extra):
            s.close()


@pytest.mark.server_settings(max_stream_connections=3)
async def test_total_stream_cap_keeps_health_and_udp_working(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    loop = asyncio.get_running_loop()
    held = []
    for _ in range(5):
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, server.address_of("tcp"))
        held.append(s)
    try:
        await asyncio.sleep(0.2)
        assert len(server.runtime.stream_connections) == 3
        assert server.runtime.stream_refusals.get("stream_limit", 0) == 2
        base = f"http://127.0.0.1:{server.server.health.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/readyz") as resp:
                body = await resp.json()
                assert resp.status == 503 and "capacity" in body["failed"]
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 200
            async with session.get(f"{base}/metrics") as resp:
                text = await resp.text()
                assert 'turn_limit{name="stream_connections"} 3.0' in text
        good = await _client(server, "udp", "udp-while-capped")
        await good.channel_bind(0x4001, echo_peer[0])
        assert await _round_trips(good, echo_peer[0], 10, b"u") == 10
        good.close()
    finally:
        for s in held:
            s.close()


@pytest.mark.server_settings(write_timeout=1.0)
async def test_a_client_that_never_reads_is_paused_then_closed(server: RunningServer) -> None:
    """Unauthenticated Allocates over TCP, never reading the 401s: the server stops
    reading at its high-water mark, holds bounded memory, and closes the connection."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    await loop.sock_connect(s, server.address_of("tcp"))
    req = encode_message(
        Method.ALLOCATE, MessageClass.REQUEST, b"a" * 12, [(0x0019, b"\x11\x00\x00\x00")]
    )
    burst = req * 2000
    sent = 0
    for _ in range(100):
        if server.runtime.stream_connections:
            break
        await asyncio.sleep(0.01)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                sent += s.send(burst)
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except OSError:
                break
            conn = next(iter(server.runtime.stream_connections.values()), None)
            if conn is None:
                break
            assert conn.framer.buffered < 2 * 1024 * 1024
            if conn.transport is not None:
                assert conn.transport.get_write_buffer_size() < 4 * 1024 * 1024
        for _ in range(50):
            if not server.runtime.stream_connections:
                break
            await asyncio.sleep(0.1)
        assert not server.runtime.stream_connections
        assert sent > 1024 * 1024  # the attack really pushed megabytes
        text = server.server.metrics.registry.get_sample_value(
            "turn_connections_closed_total", {"reason": "write_timeout"}
        )
        assert text == 1.0
    finally:
        s.close()


@pytest.mark.server_settings(handshake_timeout=1)
async def test_tls_handshake_failures_are_counted_by_reason(server: RunningServer) -> None:
    loop = asyncio.get_running_loop()
    host, port = server.address_of("tls")
    stalled = socket.socket()
    stalled.setblocking(False)
    await loop.sock_connect(stalled, (host, port))
    plain = socket.socket()
    plain.setblocking(False)
    await loop.sock_connect(plain, (host, port))
    await loop.sock_sendall(plain, b"GET / HTTP/1.0\r\n\r\n")
    import ssl

    strict = ssl.create_default_context()  # does not trust our self-signed certificate
    with pytest.raises(ssl.SSLError):
        await asyncio.open_connection(host, port, ssl=strict)
    try:
        registry = server.server.metrics.registry
        for _ in range(60):
            timeout = registry.get_sample_value(
                "turn_tls_handshake_failures_total", {"reason": "handshake_timeout"}
            )
            if timeout:
                break
            await asyncio.sleep(0.05)
        assert timeout == 1.0
        closed = registry.get_sample_value(
            "turn_connections_closed_total", {"reason": "handshake_timeout"}
        )
        assert closed == 1.0
        not_tls = registry.get_sample_value(
            "turn_tls_handshake_failures_total", {"reason": "not_tls"}
        )
        assert not_tls == 1.0
        failures = sum(
            registry.get_sample_value("turn_tls_handshake_failures_total", {"reason": r}) or 0
            for r in ("client_aborted", "unknown_ca", "certificate_unknown", "bad_certificate")
        )
        assert failures >= 1  # the client that refused our certificate
    finally:
        stalled.close()
        plain.close()


async def test_reload_with_a_denied_peer_cuts_live_channels(
    server: RunningServer,
    echo_peer: tuple[tuple[str, int], EchoProtocol],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="turnserver")
    c = await _client(server, "udp", "reload-deny")
    try:
        await c.channel_bind(0x4001, echo_peer[0])
        assert await _round_trips(c, echo_peer[0], 3, b"before") == 3
        denied = replace(server.settings, allow_loopback_peers=False)
        server.server.reload(denied)
        received = echo_peer[1].received
        assert await _round_trips(c, echo_peer[0], 3, b"after") == 0
        assert echo_peer[1].received == received  # not one packet reached the peer
        assert any("permission revoked" in r.getMessage() for r in caplog.records)
        value = server.server.metrics.registry.get_sample_value(
            "turn_permissions_revoked_total", {"reason": "peer_policy"}
        )
        assert value == 1.0
    finally:
        c.close()


def test_non_utf8_config_and_secrets_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"realm: caf\xe9\n")
    run = run_cli("serve", "--config", str(bad))
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "not UTF-8" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    secrets_file = tmp_path / "secrets"
    secrets_file.write_bytes(b"\xff\xfe secret\n")
    good = tmp_path / "good.yaml"
    good.write_text(f"auth:\n  secrets_file: {secrets_file}\n")
    run = run_cli("serve", "--config", str(good))
    assert run.returncode == 2 and "not UTF-8" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("ttl", ["\u00b2", "\u0663", "9" * 5000, "-1", "1e3", " 5"])
async def test_api_refuses_odd_ttls_with_400(server: RunningServer, ttl: str) -> None:
    from tests.support.server import ACCOUNT_SID, API_KEY, AUTH_TOKEN

    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{server.api_base}/api/v1/turn-credentials",
            params={"username": "u", "ttl": ttl, "key": API_KEY},
        ) as resp:
            assert resp.status == 400, await resp.text()
            assert "ttl" in (await resp.json())["error"]
        async with session.post(
            f"{server.api_base}/2010-04-01/Accounts/{ACCOUNT_SID}/Tokens.json",
            data={"Ttl": ttl},
            headers={"Authorization": _basic(ACCOUNT_SID, AUTH_TOKEN)},
        ) as resp:
            if ttl == " 5":  # Twilio's form values are stripped
                assert resp.status == 201
            else:
                assert resp.status == 400, await resp.text()
                assert (await resp.json())["code"] == 20001
    assert not any(status == 500 for (_, status) in server.server.api.stats.requests)  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["a\nb", "nul\x00", "rlo\u202eexe", "ls\u2028x"])
async def test_api_refuses_control_and_bidi_usernames(server: RunningServer, name: str) -> None:
    from tests.support.server import API_KEY

    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{server.api_base}/api/v1/ice-servers", params={"username": name, "key": API_KEY}
        ) as resp,
    ):
        assert resp.status == 400
        assert "username" in (await resp.json())["error"]


async def test_tokens_401_carries_www_authenticate(server: RunningServer) -> None:
    from tests.support.server import ACCOUNT_SID

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.api_base}/2010-04-01/Accounts/{ACCOUNT_SID}/Tokens.json") as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic ")


async def test_a_connection_close_is_reported_once(server: RunningServer) -> None:
    """RFC 6062 data connections were closed (and counted) twice as peer_closed."""
    seen: list[ev.ConnectionClosed] = []
    server.runtime.event_sinks.append(
        lambda e: seen.append(e) if isinstance(e, ev.ConnectionClosed) else None
    )
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    await loop.sock_connect(s, server.address_of("tcp"))
    try:
        for _ in range(100):
            if server.runtime.stream_connections:
                break
            await asyncio.sleep(0.01)
        conn = next(iter(server.runtime.stream_connections.values()))
        conn.close("peer_closed")
        conn.close("peer_closed")
        conn.close("idle_timeout")
        await asyncio.sleep(0.1)
        assert [e.reason for e in seen] == ["peer_closed"]
        assert not server.runtime.stream_connections
    finally:
        s.close()


async def test_icmp_errors_reach_the_client_as_data_indications(server: RunningServer) -> None:
    """RFC 8656 §11.6: a datagram relayed to a closed port draws an ICMP port unreachable;
    the client gets a Data indication with ICMP and XOR-PEER-ADDRESS, only for peers it
    has a permission for."""
    import struct as _struct

    from turnserver.stun import Attr

    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    peer = closed.getsockname()[:2]
    closed.close()  # nothing listens there now
    c = await _client(server, "udp", "icmp")
    try:
        await c.create_permission(peer)
        c.send_indication(peer, b"anyone there?")
        msg = await asyncio.wait_for(c.indications.get(), 3)
        assert msg.get(Attr.XOR_PEER_ADDRESS) == peer and not msg.has(Attr.DATA)
        _, icmp_type, icmp_code, _ = _struct.unpack("!HBBI", msg.get(Attr.ICMP))
        assert (icmp_type, icmp_code) == (3, 3)  # destination unreachable: port
        assert server.runtime.core.stats.icmp_to_client == 1
        # Without a permission: nothing; and at most ICMP_PER_SECOND a second
        core = server.runtime.core
        alloc = next(iter(core.allocations.values()))
        now = time.time()
        assert core.icmp_indication(alloc, ("127.0.0.2", 9), 3, 3, 0, now) is None
        sent = [core.icmp_indication(alloc, peer, 3, 3, 0, float(int(now) + 5)) for _ in range(12)]
        assert sum(x is not None for x in sent) == 10
        assert core.icmp_indication(alloc, peer, 5, 0, 0, now) is None  # not type 3 or 11
    finally:
        c.close()
