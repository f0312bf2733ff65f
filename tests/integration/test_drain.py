"""A real server process under SIGTERM (drain) and under abuse while a good client relays."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support import WORKER_COUNTS, eventually
from tests.support.procs import ServerProcess, free_port, loopback_args, turnserver_process
from tests.support.server import EchoProtocol
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.ops.dev.selfsigned import ensure_self_signed
from turnserver.ops.http.credentials import mint
from turnserver.stun import Attr, MessageClass, Method, encode_message

SECRET = "abuse-secret"
pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])


def _args(metrics_port: int, *extra: str) -> list[str]:
    lo = 37000 + (os.getpid() % 1000)
    return [
        *loopback_args(SECRET, lo, lo + 400),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--probe-interval",
        "0",
        *extra,
    ]


async def _client(server: ServerProcess, user: str, transport: str = "udp") -> TurnClient:
    cred = mint(SECRET, user, 600, time.time())
    return await TurnClient.connect(
        transport, ("127.0.0.1", server.port), cred.username, cred.password, timeout=3
    )


async def _round_trip(c: TurnClient, payload: bytes) -> None:
    c.send_channel(0x4000, payload)
    while True:
        _, data = await c.receive(1.0)
        if data == payload:
            return


async def _readyz(port: int) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as resp,
    ):
        return resp.status, await resp.json()


async def _ready(port: int) -> bool:
    return (await _readyz(port))[0] == 200


async def _wait_exit(server: ServerProcess, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while server.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    code = server.proc.poll()
    assert code is not None, "server did not exit"
    return code


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_sigterm_drains_then_exits_zero(
    tmp_path: Path, echo_peer: tuple[tuple[str, int], EchoProtocol], workers: int | None
) -> None:
    mport = free_port(socket.SOCK_STREAM)
    with turnserver_process(
        tmp_path, *_args(mport, "--drain-timeout", "20"), workers=workers
    ) as server:
        live = await _client(server, "live")
        await live.allocate()
        await live.channel_bind(0x4000, echo_peer[0])
        await _round_trip(live, b"before")
        await eventually(lambda: _ready(mport), 10)  # every worker
        server.proc.send_signal(signal.SIGTERM)
        for _ in range(50):
            status, body = await _readyz(mport)
            if status == 503:
                break
            await asyncio.sleep(0.05)
        assert status == 503 and body["failed"] == ["draining"]
        late = await _client(server, "late")
        with pytest.raises(TurnClientError) as info:
            await late.allocate()
        assert info.value.code == 508
        late.close()
        await _round_trip(live, b"during the drain")  # existing allocations keep working
        await live.refresh(0)  # the last allocation ends: the server may go
        live.close()
        assert await _wait_exit(server, 5) == 0
        assert "drained: no allocations left" in server.log()


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_drain_timeout_ends_the_process(tmp_path: Path, workers: int | None) -> None:
    mport = free_port(socket.SOCK_STREAM)
    with turnserver_process(
        tmp_path, *_args(mport, "--drain-timeout", "1"), workers=workers
    ) as server:
        stuck = await _client(server, "stuck")
        await stuck.allocate()
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert await _wait_exit(server, 10) == 0
        assert 0.9 < time.monotonic() - started < 5
        assert "drain timeout: ending 1 allocations" in server.log()
        stuck.close()


def _rss_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
    return rss * 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def _garbage(target: tuple[str, int], seconds: float, rng: random.Random) -> int:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
    sent = 0
    allocate = encode_message(
        Method.ALLOCATE, MessageClass.REQUEST, b"x" * 12, [(Attr.REQUESTED_TRANSPORT, 17)]
    )
    try:
        for s in socks:
            s.setblocking(False)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for s in socks:
                kind = rng.randrange(5)
                if kind == 0:
                    data = os.urandom(rng.randint(0, 1400))
                elif kind == 1:
                    data = allocate[: rng.randint(0, len(allocate) - 1)]  # truncated
                elif kind == 2:  # oversized, with a length field that lies
                    data = b"\x00\x03\xff\xfc\x21\x12\xa4\x42" + os.urandom(60000)
                elif kind == 3:
                    data = b"\x40\x00\x10\x00" + os.urandom(rng.randint(0, 64))
                else:  # an allocation flood of unauthenticated requests
                    data = allocate[:8] + os.urandom(12) + allocate[20:]
                try:
                    s.sendto(data, target)
                    sent += 1
                except OSError:
                    pass
            await asyncio.sleep(0.002)
    finally:
        for s in socks:
            s.close()
    return sent


async def test_abuse_does_not_disturb_a_relaying_client(
    tmp_path: Path, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    mport = free_port(socket.SOCK_STREAM)
    tls_port = free_port(socket.SOCK_STREAM)
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    ensure_self_signed(cert, key, ["localhost"])
    args = _args(mport, "--cert", cert, "--key", key, "--log-level", "info")
    cfg = tmp_path / "limits.yaml"
    cfg.write_text(
        "stream:\n  idle_timeout: 2\n  handshake_timeout: 2\nallocations:\n  max_total: 120\n"
    )
    with turnserver_process(
        tmp_path, "--config", str(cfg), *args, streams=True, tls_port=tls_port
    ) as server:
        pid = server.proc.pid
        good = await _client(server, "good")
        await good.allocate()
        await good.channel_bind(0x4000, echo_peer[0])
        await _round_trip(good, b"warm up")
        rss0, fds0 = _rss_and_fds(pid)

        async def steady() -> int:
            ok = 0
            for i in range(300):
                await _round_trip(good, f"good {i}".encode())
                ok += 1
                await asyncio.sleep(0.01)
            return ok

        async def flood_allocations() -> int:
            async def one(i: int) -> int:
                c = await _client(server, f"flood{i}")
                try:
                    await c.allocate()
                    return 1
                except TurnClientError as exc:
                    # quota, or no answer: 127.0.0.1 used up its 401 budget (rate limit)
                    assert exc.code in (486, 508, None)
                    return 0
                finally:
                    c.close()

            # many source ports at once, valid credentials, more than the quota allows
            return sum(await asyncio.gather(*(one(i) for i in range(150))))

        async def half_open() -> None:
            loop = asyncio.get_running_loop()
            held = []
            for i in range(100):
                s = socket.socket()
                s.setblocking(False)
                await loop.sock_connect(s, ("127.0.0.1", server.port if i % 5 else tls_port))
                if i % 5:
                    await loop.sock_sendall(s, b"\x00\x03\x00\x40\x21\x12")  # a third of a header
                held.append(s)
            await asyncio.sleep(3.5)  # longer than the idle and handshake timeouts
            for s in held:
                try:
                    assert await asyncio.wait_for(loop.sock_recv(s, 10), 2) == b""
                except ConnectionResetError:
                    pass
                s.close()

        rng = random.Random(7)
        results = await asyncio.gather(
            steady(),
            flood_allocations(),
            half_open(),
            _garbage(("127.0.0.1", server.port), 4.0, rng),
        )
        assert results[0] == 300  # the good client lost nothing
        assert results[1] <= 120  # the total quota held
        assert results[3] > 1000
        await asyncio.sleep(2.5)  # idle timeouts settle
        rss1, fds1 = _rss_and_fds(pid)
        # Flood allocations keep their relay sockets until they expire: at most the quota
        assert fds1 <= fds0 + 125, (fds0, fds1)
        assert rss1 <= rss0 + 64 * 1024 * 1024, (rss0, rss1)
        await _round_trip(good, b"still here")
        good.close()
        log = server.log()
        assert "Traceback" not in log and "Exception" not in log
        assert "connection closed" in log  # the half-open ones, with a reason
