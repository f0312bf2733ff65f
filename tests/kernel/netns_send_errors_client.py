"""Run inside the test's network namespace: a TURN client over TCP and one over UDP that
send to peers whose sends fail (MTU with DONT-FRAGMENT, unreachable, prohibit,
blackhole routes), then prove their allocations live on. Prints a JSON report."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from turnserver.client.turnclient import TurnClient
from turnserver.ops.http.credentials import mint
from turnserver.stun import Attr, Method

SERVER = ("192.0.2.1", int(sys.argv[1]))
SECRET = sys.argv[2]
PEERS = [("192.0.2.2", 9), ("198.51.100.2", 9), ("203.0.113.2", 9), ("198.18.5.2", 9)]


async def one(transport: str) -> dict[str, object]:
    cred = mint(SECRET, f"netns-{transport}", 600, time.time())
    c = await TurnClient.connect(transport, SERVER, cred.username, cred.password, timeout=3)
    try:
        # Allocate with DONT-FRAGMENT (RFC 8656 §7.2): the relay sets DF on its datagrams
        await c.request(
            Method.ALLOCATE,
            [(Attr.REQUESTED_TRANSPORT, 17), (Attr.DONT_FRAGMENT, b"")],
        )
        await c.create_permission(*PEERS)
        await c.channel_bind(0x4000, PEERS[0])
        for _ in range(200):
            for peer in PEERS:
                c.send_indication(peer, b"x" * 2000)  # over the 1280 MTU for the first
            c.send_channel(0x4000, b"y" * 2000)
        await asyncio.sleep(0.5)
        lifetime = await c.refresh(600)  # the allocation (and TCP connection) lives
        return {"transport": transport, "refresh": lifetime}
    finally:
        c.close()


async def main() -> None:
    print(json.dumps([await one("tcp"), await one("udp")]))


asyncio.run(main())
