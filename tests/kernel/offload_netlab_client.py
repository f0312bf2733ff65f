"""Run in the client's network namespace of the netlab test (ip netns exec NS python THIS
SERVER_IP PEER_IP:PORT METRICS_URL COUNT ALLOCATIONS [big] [userspace]): for each of
ALLOCATIONS aioice allocations in turn (each from its own port: with --workers they
spread), relay COUNT datagrams through a channel to the echo peer in another namespace
and wait for each echo (every tenth datagram of 3,000 bytes with big); prints one JSON
object with what came back and the server's turn_offload_* and relay metrics while
every allocation is still live (with userspace no kernel flow is waited for)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aioice import turn

from turnserver.ops.http.credentials import mint


class Queue(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("turn_offload_", "turn_relayed_packets_total")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def main(
    server_ip: str,
    peer: tuple[str, int],
    url: str,
    count: int,
    allocations: int,
    big: bool,
    userspace: bool,
) -> None:
    deadline = time.monotonic() + 30
    while True:  # the server starts in its own namespace: wait until it answers
        try:
            metrics(url)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    cred = mint("s", "netlab", 600, time.time())
    echoed = 0
    endpoints = []
    for n in range(1, allocations + 1):
        relay_t, proto = await turn.create_turn_endpoint(
            Queue, server_addr=(server_ip, 3478), username=cred.username, password=cred.password
        )
        endpoints.append(relay_t)
        for i in range(count):
            payload = b"%05d" % i * (1 + i % 200)  # 5 to 1,000 bytes
            if big and i % 10 == 9:
                payload = b"%05d" % i * 600
            relay_t.sendto(payload, peer)
            echoed += await asyncio.wait_for(proto.queue.get(), 3) == payload
            if i == 4 and not userspace:  # aioice binds its channel after the first sends
                for _ in range(100):
                    if metrics(url).get("turn_offload_flows_active") == n:
                        break
                    await asyncio.sleep(0.05)
    after = metrics(url)
    for relay_t in endpoints:
        relay_t.close()  # Refresh with LIFETIME 0
    await asyncio.sleep(0.1)
    print(json.dumps({"echoed": echoed, "metrics": after}))


if __name__ == "__main__":
    host, port = sys.argv[2].rsplit(":", 1)
    big, userspace = "big" in sys.argv[6:], "userspace" in sys.argv[6:]
    asyncio.run(
        main(
            sys.argv[1],
            (host, int(port)),
            sys.argv[3],
            int(sys.argv[4]),
            int(sys.argv[5]),
            big,
            userspace,
        )
    )
