"""aioice's TURN client (written by others) against our server over UDP."""

from __future__ import annotations

import asyncio
import time

import pytest
from aioice import turn

from turnserver.ops.credentials import mint

from .conftest import SECRET, EchoProtocol, RunningServer


class Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


async def _round_trips(
    server: RunningServer, peer: tuple[str, int], username: str, password: str, count: int = 20
) -> tuple[str, int]:
    transport, proto = await turn.create_turn_endpoint(
        Collector,
        server_addr=server.address,
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
