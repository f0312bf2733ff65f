"""What abuse costs: the server CPU of the worst inputs we know, and what each attack does
to a good client's loss and round-trip time, with the server's RSS and descriptors
before and after. `make abuse` runs it; everything targets 127.0.0.1 and every loop is
bounded in count and time.

Part 1 (in process, the sans-IO core): CPU per input for normal requests and for the
worst unauthenticated and authenticated inputs found, as a multiple of one Allocate.
Part 2 (a server process on loopback): a good client relays 50 packets/s through a
channel while each attack runs for --seconds; prints loss, RTT p50/p99, RSS and fds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.core.auth import Authenticator, Credentials, NonceIssuer
from turnserver.core.config import CoreConfig, RelayAddress
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.policy import DefaultPeerPolicy
from turnserver.core.server import TurnServer
from turnserver.ops.dev.selfsigned import ensure_self_signed
from turnserver.ops.http.credentials import mint
from turnserver.stun import Attr, MessageClass, Method, encode_message, long_term_key
from turnserver.testing import free_port, loopback_args, rss_bytes, serve_command

REALM = "abuse.test"


class _Relay:
    address = ("127.0.0.1", 50000)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        pass

    def close(self) -> None:
        pass


class _Opener:
    def open_relay(
        self, allocation: object, host: str, port: int, *, dont_fragment: bool
    ) -> _Relay:
        return _Relay()

    def open_tcp_relay(self, allocation: object, host: str, port: int) -> None:
        return None

    def has_capacity(self, sockets: int) -> bool:
        return True


def _core() -> TurnServer:
    config = CoreConfig(
        relay_addresses=(RelayAddress("127.0.0.1", "127.0.0.1", 4),),
        min_port=50000,
        max_port=60000,
        challenge_rate=1e9,
        challenge_burst=10**9,
    )
    creds = Credentials.build(REALM, passwords={"alice": "pw"})
    return TurnServer(
        config,
        Authenticator(creds, NonceIssuer(b"k" * 32)),
        _Opener(),
        DefaultPeerPolicy(),  # type: ignore[arg-type]
    )


def _header(mtype: int, body: bytes) -> bytes:
    return struct.pack("!HHI12s", mtype, len(body), 0x2112A442, os.urandom(12)) + body


def _cost(core: TurnServer, make: Callable[[int], tuple[bytes, FiveTuple]], n: int) -> float:
    inputs = [make(i) for i in range(n)]
    started = time.process_time()
    for data, ft in inputs:
        core.handle_message(data, ft, 1_800_000_000.0)
        core.events.clear()
    return (time.process_time() - started) / n * 1e6


def core_costs(n: int) -> list[tuple[str, float]]:
    core = _core()
    nonce = core.auth.nonces.issue("10.0.0.1", 1_800_000_000.0)
    key = long_term_key("alice", REALM, "pw")

    def ft(i: int) -> FiveTuple:
        return FiveTuple(("10.0.0.1", 1024 + i % 60000), ("10.0.0.2", 3478), ClientTransport.UDP)

    def auth_attrs() -> list[tuple[int, object]]:
        return [(Attr.USERNAME, "alice"), (Attr.REALM, REALM), (Attr.NONCE, nonce)]

    def allocate(i: int) -> tuple[bytes, FiveTuple]:
        attrs = [(Attr.REQUESTED_TRANSPORT, 17), *auth_attrs()]
        data = encode_message(
            Method.ALLOCATE, MessageClass.REQUEST, os.urandom(12), attrs, integrity_key=key
        )
        return data, ft(i)

    unauth = encode_message(
        Method.ALLOCATE, MessageClass.REQUEST, b"x" * 12, [(Attr.REQUESTED_TRANSPORT, 17)]
    )
    empty = struct.pack("!HH", 0x8123, 0)
    rows: list[tuple[str, float]] = []
    rows.append(("Allocate (authenticated, creates a relay)", _cost(core, allocate, n)))
    core.shutdown(1_800_000_000.0)
    rows.append(("Allocate without credentials (401)", _cost(core, lambda i: (unauth, ft(i)), n)))
    rows.append(
        (
            "Binding request",
            _cost(core, lambda i: (_header(0x0001, b""), ft(i)), n),
        )
    )
    rows.append(
        (
            "64 KB, 16,371 empty attributes (refused by size)",
            _cost(core, lambda i: (_header(0x0003, empty * 16_371), ft(i)), n),
        )
    )
    rows.append(
        (
            "1,472 B, 363 empty attributes (refused: attribute cap)",
            _cost(core, lambda i: (_header(0x0003, empty * 363), ft(i)), n),
        )
    )
    big_attr = struct.pack("!HH", 0x8123, 60) + b"\0" * 60
    transport = struct.pack("!HHI", 0x0019, 4, 0x11000000)
    rows.append(
        (
            "4 KB Allocate, 64 unknown attributes (the cap) -> 401",
            _cost(core, lambda i: (_header(0x0003, big_attr * 63 + transport), ft(i)), n),
        )
    )
    rows.append(
        (
            "64 KB Send indication without an allocation",
            _cost(
                core,
                lambda i: (
                    _header(0x0016, struct.pack("!HH", 0x0013, 65000) + b"\0" * 65000),
                    ft(i),
                ),
                n,
            ),
        )
    )
    superscript = encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        b"y" * 12,
        [(Attr.REQUESTED_TRANSPORT, 17), (Attr.USERNAME, "²"), (Attr.REALM, REALM),
         (Attr.NONCE, nonce)],
        integrity_key=key,
    )  # fmt: skip
    rows.append(("USERNAME '²' with MESSAGE-INTEGRITY (raised out of the core once) -> 401",
                 _cost(core, lambda i: (superscript, ft(i)), n)))  # fmt: skip
    return rows


# ---- part 2: live attacks ---------------------------------------------------------------


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def good_client(port: int, secret: str, peer: tuple[str, int], seconds: float) -> str:
    cred = mint(secret, "good", 600, time.time())
    c = await TurnClient.connect("udp", ("127.0.0.1", port), cred.username, cred.password)
    try:
        await c.allocate()
        await c.channel_bind(0x4000, peer)
        rtts: list[float] = []
        lost = sent = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sent += 1
            started = time.monotonic()
            c.send_channel(0x4000, b"%d" % sent)
            try:
                await c.receive(1.0)
                rtts.append((time.monotonic() - started) * 1000)
            except TurnClientError:
                lost += 1
            await asyncio.sleep(0.02)
        if not rtts:
            return f"loss 100 % of {sent}"
        rtts.sort()
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
        return (
            f"loss {100 * lost / sent:.1f} % of {sent}, RTT p50 {statistics.median(rtts):.2f} ms"
            f" p99 {p99:.2f} ms"
        )
    finally:
        try:
            await c.refresh(0)
        except TurnClientError:
            pass
        c.close()


def flood_udp(port: int, payload: Callable[[], bytes], rate: float, seconds: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    deadline = time.monotonic() + seconds
    interval = 1.0 / rate
    nxt = time.monotonic()
    while time.monotonic() < deadline:
        try:
            sock.sendto(payload(), ("127.0.0.1", port))
        except OSError:
            pass
        nxt += interval
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    sock.close()


def slowloris(port: int, count: int, seconds: float) -> None:
    socks = []
    deadline = time.monotonic() + seconds
    for _ in range(count):
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            s.send(b"\x00")
        except OSError:
            s.close()
            continue
        socks.append(s)
    while time.monotonic() < deadline:
        time.sleep(0.2)
    for s in socks:
        s.close()


def never_reads(port: int, seconds: float) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    req = encode_message(
        Method.ALLOCATE, MessageClass.REQUEST, b"a" * 12, [(Attr.REQUESTED_TRANSPORT, 17)]
    )
    burst = req * 2000
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            s.send(burst)
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            break
    s.close()


async def live(seconds: float) -> list[tuple[str, str, str]]:
    port, mport, tls = free_port(), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    secret = secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="turnserver-abuse-"))
    cert, key = str(workdir / "cert.pem"), str(workdir / "key.pem")
    ensure_self_signed(cert, key, ["localhost"])
    server = subprocess.Popen(
        serve_command(
            port,
            *loopback_args(secret, 45000, 47000),
            "--probe-interval",
            "0",
            "--log-level",
            "warning",
            "--cert",
            cert,
            "--key",
            key,
            streams=True,
            tls_port=tls,
            metrics=f"127.0.0.1:{mport}",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo.get_extra_info("sockname")[:2]
    rows: list[tuple[str, str, str]] = []
    empty = struct.pack("!HH", 0x8123, 0)
    attacks: list[tuple[str, Callable[[], None]]] = [
        ("none (baseline)", lambda: time.sleep(seconds)),
        (
            "64 KB attribute floods, 100/s (52 Mbit/s)",
            lambda: flood_udp(port, lambda: _header(0x0003, empty * 16_371), 100, seconds),
        ),
        (
            "MTU attribute floods, 1,500/s",
            lambda: flood_udp(port, lambda: _header(0x0003, empty * 363), 1500, seconds),
        ),
        ("slowloris: 2,000 TCP connections, 1 byte each", lambda: slowloris(port, 2000, seconds)),
        ("a TCP client that never reads", lambda: never_reads(port, seconds)),
        ("1,500 silent HTTP connections to /metrics", lambda: idle_http(mport, 1500, seconds)),
        ("replayed TLS ClientHello, as fast as possible", lambda: hello_flood(tls, seconds)),
        (
            "relaying into the server itself (ChannelBind to its own ports)",
            lambda: self_relay(port, secret, seconds),
        ),
    ]
    try:
        await asyncio.sleep(1.5)
        for name, attack in attacks:
            before = rss_bytes(server.pid) / 2**20, len(os.listdir(f"/proc/{server.pid}/fd"))
            cpu0 = _cpu(server.pid)
            attack_task = loop.run_in_executor(None, attack)
            result = await good_client(port, secret, peer, seconds)
            await attack_task
            cpu = _cpu(server.pid) - cpu0
            await asyncio.sleep(0.5)
            after = rss_bytes(server.pid) / 2**20, len(os.listdir(f"/proc/{server.pid}/fd"))
            rows.append(
                (
                    name,
                    result,
                    f"server CPU {100 * cpu / seconds:.0f} %, RSS {before[0]:.0f}->{after[0]:.0f}"
                    f" MB, fds {before[1]}->{after[1]}",
                )
            )
    finally:
        echo.close()
        os.killpg(server.pid, signal.SIGINT)
        server.wait(15)
    return rows


def idle_http(port: int, count: int, seconds: float) -> None:
    """Connections that never send a request (the HTTP listeners' caps evict them)."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    time.sleep(seconds)
    for s in socks:
        s.close()


def _client_hello() -> bytes:
    """One TLS ClientHello, made once: the attacker's cost per handshake is a send."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def hello_flood(port: int, seconds: float) -> None:
    """Replay one ClientHello on new connections (the per-source limit refuses most)."""
    hello = _client_hello()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(hello)
                s.settimeout(0.05)
                try:
                    s.recv(4096)
                except OSError:
                    pass
        except OSError:
            time.sleep(0.001)


def self_relay(port: int, secret: str, seconds: float) -> None:
    """An authenticated client binding channels to the server's own listener and
    metrics ports, over and over (every one refused with 403)."""

    async def run() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            cred = mint(secret, "nester", 600, time.time())
            c = await TurnClient.connect("udp", ("127.0.0.1", port), cred.username, cred.password)
            try:
                await c.allocate()
                for n in range(20):
                    try:
                        await c.channel_bind(0x4000 + n, ("127.0.0.1", port))
                    except TurnClientError:
                        pass
                await c.refresh(0)
            except TurnClientError:
                pass
            finally:
                c.close()

    asyncio.run(run())


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=2000, help="inputs per row in part 1")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per attack")
    parser.add_argument("--core-only", action="store_true")
    args = parser.parse_args()
    rows = core_costs(args.inputs)
    base = rows[0][1]
    print("## Server CPU per input (sans-IO core, one process)\n")
    print("| input | µs | times an Allocate |\n|---|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} | {us / base:.2f} |")
    if args.core_only:
        return
    print("\n## A good client (50 packets/s through a channel) under each attack\n")
    print("| attack | good client | server |\n|---|---|---|")
    for name, result, server in asyncio.run(live(args.seconds)):
        print(f"| {name} | {result} | {server} |")


if __name__ == "__main__":
    main()
