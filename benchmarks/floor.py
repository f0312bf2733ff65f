"""The Python floor for relaying: a minimal uvloop relay with no TURN logic.

    python benchmarks/floor.py PORT PEER_HOST PEER_PORT

Clients send ChannelData (4-byte header, payload) to PORT; the first datagram of a client
gets it a relay socket of its own. Payloads go to the peer from that socket (recvfrom,
one dict lookup, sendto); the peer's answers come back with the header in front
(recvfrom, sendmsg). No authentication, permissions, channels, counters or checks: what
any Python relay must pay per packet on this machine. benchmarks/run.py measures it
beside our server and coturn.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import sys

import uvloop

HEADER = struct.Struct("!HH")


def main() -> None:
    port, peer = int(sys.argv[1]), (sys.argv[2], int(sys.argv[3]))
    loop = uvloop.new_event_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    listener.bind(("127.0.0.1", port))
    listener.setblocking(False)
    relays: dict[tuple[str, int], socket.socket] = {}

    def from_peer(sock: socket.socket, client: tuple[str, int]) -> None:
        recvfrom, sendmsg, pack = sock.recvfrom, listener.sendmsg, HEADER.pack
        for _ in range(64):
            try:
                data, _addr = recvfrom(65535)
            except BlockingIOError:
                return
            sendmsg((pack(0x4000, len(data)), data), (), 0, client)

    def from_clients() -> None:
        recvfrom = listener.recvfrom
        for _ in range(64):
            try:
                data, addr = recvfrom(65535)
            except BlockingIOError:
                return
            relay = relays.get(addr)
            if relay is None:
                relay = relays[addr] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                relay.bind(("127.0.0.1", 0))
                relay.setblocking(False)
                loop.add_reader(relay.fileno(), from_peer, relay, addr)
            relay.sendto(data[4:], peer)

    loop.add_reader(listener.fileno(), from_clients)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    loop.run_until_complete(stop.wait())
    for relay in relays.values():
        relay.close()
    listener.close()


if __name__ == "__main__":
    main()
