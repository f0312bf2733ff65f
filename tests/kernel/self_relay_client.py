"""Run inside the test's network namespace (two addresses on one interface): TURN
clients try to relay into the server itself and to each other. Prints a JSON report."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.ops.http.credentials import mint
from turnserver.stun import Attr, Method

SERVER = ("198.51.200.1", 3478)
SECOND = "198.51.200.2"
SECRET = sys.argv[1]
METRICS_PORT = int(sys.argv[2])


async def client(user: str, transport: str = "udp") -> TurnClient:
    cred = mint(SECRET, user, 600, time.time())
    return await TurnClient.connect(transport, SERVER, cred.username, cred.password, timeout=3)


async def code(coro: object) -> int:
    try:
        await coro  # type: ignore[misc]
    except TurnClientError as exc:
        return exc.code or -1
    return 0


async def main() -> dict[str, object]:
    out: dict[str, object] = {}
    a, b = await client("alice"), await client("bob")
    relayed_a, _ = await a.allocate()
    relayed_b, _ = await b.allocate()
    out["second_address"] = await code(a.create_permission((SECOND, 5000)))
    out["own_listener"] = await code(a.channel_bind(0x4000, (SERVER[0], 3478)))
    out["own_metrics"] = await code(a.channel_bind(0x4001, (SERVER[0], METRICS_PORT)))
    out["relay_outside_range"] = await code(a.channel_bind(0x4002, (SERVER[0], 22)))
    out["loopback_listener"] = await code(a.channel_bind(0x4003, ("127.0.0.1", 3478)))
    out["mapped_loopback"] = await code(a.create_permission(("::ffff:127.0.0.1", 3478)))
    # relay to relay: two clients of this server reach each other
    await b.create_permission(relayed_a)
    out["relay_to_relay"] = await code(a.channel_bind(0x4004, relayed_b))
    a.send_channel(0x4004, b"hello b")
    try:
        peer, data = await b.receive(2)
        out["b_received"] = data.decode()
        out["b_received_from"] = list(peer) if isinstance(peer, tuple) else peer
    except TurnClientError as exc:
        out["b_received"] = str(exc)
    # an address added to the host later is no peer from then on, and permissions to it end
    out["before_added"] = await code(a.create_permission(("198.51.200.9", 5000)))
    subprocess.run(["ip", "addr", "add", "198.51.200.9/24", "dev", "d0"], check=True)
    deadline = time.monotonic() + 3
    after = 0
    while time.monotonic() < deadline:
        after = await code(a.create_permission(("198.51.200.9", 5000)))
        if after == 403:
            out["added_refused_after"] = round(3 - (deadline - time.monotonic()), 3)
            break
        await asyncio.sleep(0.05)
    out["after_added"] = after
    # RFC 6062: a TCP allocation cannot Connect to the metrics port of its own server
    c = await client("carol", "tcp")
    await c.allocate(tcp=True)
    out["connect_metrics"] = await code(
        c.request(Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, (SERVER[0], METRICS_PORT))])
    )
    for x in (a, b, c):
        x.close()
    return out


print(json.dumps(asyncio.run(main())))
