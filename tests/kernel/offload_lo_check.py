"""Run inside a network namespace the test made (ip netns exec NS python THIS OBJ):
the BPF program on the namespace's `lo` ingress relays real datagrams between real
sockets, both ways, byte-exact, with no UDP checksum errors; removed flows go back to
user space; a datagram that would exceed the MTU once the header is added goes up.
Prints one JSON object."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from turnserver.io.kernel.program import ChannelRelayProgram, ClientFlow, PeerFlow


def udp_errors() -> tuple[int, int]:
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    head, values = [ln for ln in lines if ln[0] == "Udp:"][:2]
    row = dict(zip(head[1:], map(int, values[1:]), strict=True))
    return row["InErrors"], row["InCsumErrors"]


def sock(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(1.0)
    return s


def quiet(s: socket.socket) -> bool:
    s.settimeout(0.2)
    try:
        s.recvfrom(65535)
    except TimeoutError:
        return True
    finally:
        s.settimeout(1.0)
    return False


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    prog = ChannelRelayProgram(Path(sys.argv[1]))
    out: dict[str, object] = {}
    try:
        prog.attach(socket.if_nametoindex("lo"))
        client, listener = sock("127.0.0.2"), sock("127.0.0.1")
        relay, peer = sock("127.0.0.1"), sock("127.0.0.3")
        c = ClientFlow(client.getsockname(), listener.getsockname(), 0x4001)
        p = PeerFlow(relay.getsockname(), peer.getsockname())
        prog.add(c, p)
        errors = udp_errors()
        to_peer = to_client = 0
        for i in range(100):
            payload = bytes([i]) * (1 + i * 13)
            client.sendto(
                struct.pack("!HH", 0x4001, len(payload)) + payload, listener.getsockname()
            )
            data, src = peer.recvfrom(65535)
            to_peer += data == payload and src == relay.getsockname()
            peer.sendto(payload, relay.getsockname())
            data, src = client.recvfrom(65535)
            expected = struct.pack("!HH", 0x4001, len(payload)) + payload
            to_client += data == expected and src == listener.getsockname()
        out["to_peer_exact"] = to_peer
        out["to_client_exact"] = to_client
        out["user_space_saw_nothing"] = quiet(listener) and quiet(relay)
        out["udp_errors"] = [a - b for a, b in zip(udp_errors(), errors, strict=True)]
        out["counters"] = list(prog.counters(c, p))
        # the MTU: lo at 1280, a 1260-byte datagram from the peer cannot take 4 more
        subprocess.run(["ip", "link", "set", "lo", "mtu", "1280"], check=True)
        peer.sendto(b"m" * 1250, relay.getsockname())  # 20 + 8 + 1250 = 1278, +4 > 1280
        data, src = relay.recvfrom(65535)
        out["mtu_passed_up"] = data == b"m" * 1250 and src == peer.getsockname()
        out["pass_reasons"] = prog.pass_reasons()
        out["removed"] = list(prog.remove(c, p))
        client.sendto(struct.pack("!HH", 0x4001, 4) + b"back", listener.getsockname())
        data, _ = listener.recvfrom(65535)
        out["after_removal_user_space"] = data == struct.pack("!HH", 0x4001, 4) + b"back"
    finally:
        prog.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
