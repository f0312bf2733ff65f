"""Safe defaults: with no limit configured, one credential cannot exhaust the server.

Each per-allocation default is hit from one credential and answered with its documented
code while another user keeps relaying; a process with a low `ulimit -n` refuses at its
derived descriptor budget and never meets EMFILE."""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import eventually
from tests.support.procs import free_port, loopback_args, serve_command
from tests.support.server import SECRET, EchoProtocol, RunningServer
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.ops.config.settings import Settings
from turnserver.ops.http.credentials import mint
from turnserver.stun import Attr, Method

DEFAULTS = Settings()


async def _client(
    server: RunningServer, scheme: str, user: str, *, tcp: bool = False
) -> TurnClient:
    cred = mint(SECRET, user, 600, time.time())
    c = await TurnClient.connect(
        scheme, server.address_of(scheme), cred.username, cred.password, timeout=3
    )
    await c.allocate(tcp=tcp)
    return c


async def _code(coro: object) -> int | None:
    try:
        await coro  # type: ignore[misc]
    except TurnClientError as exc:
        return exc.code
    return 0


def test_defaults_are_finite() -> None:
    assert DEFAULTS.max_permissions_per_allocation == 128
    assert DEFAULTS.max_channels_per_allocation == 128
    assert DEFAULTS.max_peer_connections_per_allocation == 32
    assert DEFAULTS.max_pending_connects_per_allocation == 8
    assert DEFAULTS.max_stream_connections_per_ip == 256


async def test_one_credential_meets_each_default_and_others_relay(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    greedy = await _client(server, "udp", "greedy")
    other = await _client(server, "udp", "other")
    try:
        await other.channel_bind(0x4000, echo_peer[0])
        limit = DEFAULTS.max_permissions_per_allocation
        peers = [(f"127.0.{i // 250}.{1 + i % 250}", 9) for i in range(limit + 1)]
        for i in range(0, limit, 32):
            await greedy.create_permission(*peers[i : i + 32])
        assert await _code(greedy.create_permission(peers[limit])) == 508
        for n in range(DEFAULTS.max_channels_per_allocation):
            await greedy.channel_bind(0x4000 + n, peers[n])
        code = await _code(greedy.channel_bind(0x4000 + limit, (peers[0][0], 10)))
        assert code == 508
        failures = server.server.metrics.registry.get_sample_value(
            "turn_request_failures_total",
            {"method": "channel_bind", "code": "508", "reason": "quota_channels"},
        )
        assert failures == 1.0
        for i in range(20):  # the other user is untouched
            other.send_channel(0x4000, b"o%d" % i)
            assert (await other.receive(2))[1] == b"o%d" % i
    finally:
        greedy.close()
        other.close()


async def test_rfc6062_connects_are_limited_per_allocation(server: RunningServer) -> None:
    # Peers that accept: each Connect becomes a peer connection waiting for ConnectionBind
    listeners = []
    for _ in range(DEFAULTS.max_peer_connections_per_allocation + 1):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        listeners.append(s)
    # Peers whose accept queue is full: a Connect to them stays in progress (SYN dropped)
    stuck = []
    fillers = []
    for _ in range(DEFAULTS.max_pending_connects_per_allocation + 1):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        f = socket.create_connection(s.getsockname()[:2], timeout=2)
        stuck.append(s)
        fillers.append(f)
    c = await _client(server, "tcp", "connector", tcp=True)
    c2 = await _client(server, "tcp", "connector2", tcp=True)
    try:
        # Pending Connects: the ninth is refused while eight are in progress
        pending = [
            asyncio.create_task(
                c2.request(Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, s.getsockname()[:2])])
            )
            for s in stuck[:-1]
        ]
        await asyncio.sleep(0.3)
        ninth = stuck[-1].getsockname()[:2]
        assert await _code(c2.request(Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, ninth)])) == 508
        for t in pending:
            t.cancel()
        # Established peer connections: 32, then 508
        for s in listeners[:-1]:
            await c.request(Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, s.getsockname()[:2])])
        last = listeners[-1].getsockname()[:2]
        assert await _code(c.request(Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, last)])) == 508
        registry = server.server.metrics.registry
        for reason in ("quota_connections", "quota_pending_connects"):
            value = registry.get_sample_value(
                "turn_request_failures_total",
                {"method": "connect", "code": "508", "reason": reason},
            )
            assert value == 1.0, reason
    finally:
        c.close()
        c2.close()
        for s in [*listeners, *stuck, *fillers]:
            s.close()


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))


@pytest.mark.one_loop  # the server is a subprocess: the test's loop is only its client's
async def test_low_ulimit_refuses_cleanly_at_the_derived_limit(
    tmp_path: Path, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            serve_command(
                port,
                *loopback_args(SECRET, 42000, 42999),
                "--probe-interval",
                "0",
                streams=True,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_low_nofile,
        )
    clients: list[TurnClient] = []
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 15
        while b"listening on" not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.05)
        assert b"descriptor budget 72" in log_path.read_bytes()  # 200 less a reserve of 128
        refused = None
        for i in range(120):
            cred = mint(SECRET, f"fd{i}", 600, time.time())
            c = await TurnClient.connect(
                "udp", ("127.0.0.1", port), cred.username, cred.password, timeout=3
            )
            clients.append(c)
            try:
                await c.allocate()
            except TurnClientError as exc:
                refused = (i, exc.code)
                break
        assert refused == (72, 508), refused
        # TCP connections are refused at accept, the process keeps serving
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            held.append(s)
        await clients[0].channel_bind(0x4000, echo_peer[0])
        clients[0].send_channel(0x4000, b"still relaying")
        assert (await clients[0].receive(2))[1] == b"still relaying"
        text = log_path.read_text()
        assert "EMFILE" not in text and "Too many open files" not in text
        assert "Traceback" not in text
        assert "fd_limit" in text
    finally:
        for c in clients:
            c.close()
        for s in held:
            s.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.server_settings(max_stream_connections_per_ip=0)
async def test_zero_still_means_unlimited(server: RunningServer) -> None:
    """0 lifts the per-address cap: more connections from one address than the default
    cap (256) are all admitted."""
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, server.address_of("tcp"))
            held.append(s)
        await eventually(lambda: len(server.runtime.stream_connections) == 300)
        assert not server.runtime.stream_refusals
    finally:
        for s in held:
            s.close()
