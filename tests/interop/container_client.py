"""A TURN client against a server in a container, run by tests/interop/test_image.py on the host
or inside a network namespace (ip netns exec NS python THIS ...): a STUN Binding, then
aioice (a client we did not write) allocates, relays COUNT packets to a UDP echo peer
(Send indications first, then a channel) and the metrics are read. Prints one JSON
line; with --hold it then keeps the allocation until its stdin closes."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aioice import turn

from turnserver.ops.http.credentials import mint
from turnserver.testing import stun_ping


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


async def main(args: argparse.Namespace) -> None:
    host, port = args.server.rsplit(":", 1)
    server = (host, int(port))
    out: dict[str, Any] = {"stun": stun_ping(server)}
    loop = asyncio.get_running_loop()
    echo_t, _ = await loop.create_datagram_endpoint(Echo, local_addr=(args.peer_host, 0))
    peer = echo_t.get_extra_info("sockname")[:2]
    cred = mint(args.secret, "image-test", 600, time.time())
    relay_t, proto = await turn.create_turn_endpoint(
        Collect,
        server_addr=server,
        username=cred.username,
        password=cred.password,
        lifetime=600,
    )
    out["relayed"] = list(relay_t.get_extra_info("sockname")[:2])
    echoed = 0
    for i in range(args.count):
        payload = f"packet {i:05d}".encode() * 10
        relay_t.sendto(payload, peer)
        try:
            if await asyncio.wait_for(proto.queue.get(), 2) == payload:
                echoed += 1
        except TimeoutError:
            pass
    out["echoed"] = echoed
    if args.metrics:
        with urllib.request.urlopen(args.metrics, timeout=5) as resp:
            text = resp.read().decode()
        out["metrics"] = [ln for ln in text.splitlines() if ln.startswith("turn_offload_")]
    print(json.dumps(out), flush=True)
    if args.hold:
        await loop.run_in_executor(None, sys.stdin.read)
    relay_t.close()
    echo_t.close()
    await asyncio.sleep(0.1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True, help="HOST:PORT of the TURN server")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--peer-host", default="127.0.0.1")
    parser.add_argument("--metrics", default="", help="a /metrics URL to read at the end")
    parser.add_argument("--hold", action="store_true")
    asyncio.run(main(parser.parse_args()))
