"""aioice's TURN client (written by others) against our server over UDP."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from aioice import turn

from tests.support import WORKER_COUNTS, eventually
from tests.support.procs import free_port, loopback_args, turnserver_process
from tests.support.server import SECRET, EchoProtocol, RunningServer
from turnserver.ops.http.credentials import mint


class Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


async def _round_trips(
    server: RunningServer | tuple[str, int],
    peer: tuple[str, int],
    username: str,
    password: str,
    count: int = 20,
) -> tuple[str, int]:
    transport, proto = await turn.create_turn_endpoint(
        Collector,
        server_addr=server if isinstance(server, tuple) else server.address,
        username=username,
        password=password,
        lifetime=600,
    )
    try:
        relayed = transport.get_extra_info("sockname")
        for i in range(count):
            payload = f"packet {i}".encode() * 8
            transport.sendto(payload, peer)
            data, addr = await asyncio.wait_for(proto.queue.get(), 3)
            assert data == payload
            assert addr[:2] == peer
        return relayed
    finally:
        transport.close()
        await asyncio.sleep(0.05)


async def test_aioice_rest_credentials(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    peer, echo = echo_peer
    cred = mint(SECRET, "aioice", 600, time.time())
    relayed = await _round_trips(server, peer, cred.username, cred.password)
    assert relayed[0] == "127.0.0.1"
    assert server.settings.min_port <= relayed[1] <= server.settings.max_port
    assert echo.received == 20
    # aioice sends its first packets as Send indications, then over a channel
    await asyncio.sleep(0.05)
    assert not server.runtime.core.allocations  # aioice refreshed with LIFETIME 0


async def test_aioice_static_user(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    peer, _ = echo_peer
    await _round_trips(server, peer, "alice", "alice-pw", count=5)


async def test_aioice_wrong_password_is_refused(server: RunningServer) -> None:
    with pytest.raises(Exception, match=r"401|Unauthorized"):
        await asyncio.wait_for(
            turn.create_turn_endpoint(
                Collector, server_addr=server.address, username="alice", password="wrong"
            ),
            10,
        )


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_aioice_clients_on_every_worker(
    tmp_path: Path, echo_peer: tuple[tuple[str, int], EchoProtocol], workers: int | None
) -> None:
    """A server process with the default worker count and with one: eight aioice clients
    at once (their allocations spread over the workers) relay 20 round trips each, a
    wrong password gets 401, and every allocation ends when aioice closes."""
    peer, echo = echo_peer
    mport = free_port(socket.SOCK_STREAM)
    lo = 31000 + (os.getpid() * 7) % 3000
    with turnserver_process(
        tmp_path,
        *loopback_args(SECRET, lo, lo + 399),
        "--probe-interval",
        "0",
        workers=workers,
        metrics=f"127.0.0.1:{mport}",
    ) as proc:
        address = ("127.0.0.1", proc.port)

        async def one(i: int) -> tuple[str, int]:
            cred = mint(SECRET, f"aioice-{i}", 600, time.time())
            return await _round_trips(address, peer, cred.username, cred.password)

        relayed = await asyncio.gather(*(one(i) for i in range(8)))
        assert all(lo <= port <= lo + 399 for _, port in relayed)
        assert echo.received == 8 * 20
        with pytest.raises(Exception, match=r"401|Unauthorized"):
            await asyncio.wait_for(
                turn.create_turn_endpoint(
                    Collector, server_addr=address, username="nobody", password="wrong"
                ),
                10,
            )

        async def none_left() -> bool:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{mport}/metrics") as resp,
            ):
                text = await resp.text()
            active = [
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("turn_allocations_active{")
            ]
            return sum(active) == 0

        await eventually(none_left, 10, interval=0.6)  # aioice refreshed with LIFETIME 0
