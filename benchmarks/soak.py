"""Soak: allocation churn plus steady relay traffic against a server process on loopback,
sampling the server's RSS and open file descriptors. Both must stay flat.

    python benchmarks/soak.py --duration 120 [--churn 20] [--streams 10]

Every loop is bounded by --duration; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))


from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.ops.http.credentials import mint
from turnserver.testing import free_port, loopback_args, rss_bytes, serve_command


def rss_fds(pid: int) -> tuple[float, int]:
    return rss_bytes(pid) / (1024 * 1024), len(os.listdir(f"/proc/{pid}/fd"))


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def run(args: argparse.Namespace) -> int:
    port = free_port()
    secret = secrets.token_hex(16)
    server = subprocess.Popen(
        serve_command(
            port,
            *loopback_args(secret, 45000, 47000),
            "--log-level",
            "warning",
        ),
        stdout=subprocess.DEVNULL,
    )
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo.get_extra_info("sockname")[:2]
    deadline = time.monotonic() + args.duration
    counters = {"allocations": 0, "failures": 0, "packets": 0, "lost": 0}
    await asyncio.sleep(1.0)

    async def client(user: str) -> TurnClient:
        cred = mint(secret, user, 600, time.time())
        return await TurnClient.connect(
            "udp", ("127.0.0.1", port), cred.username, cred.password, timeout=3
        )

    async def churn() -> None:
        i = 0
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                c = await client(f"churn{i % 50}")
                await c.allocate()
                await c.create_permission(peer)
                await c.refresh(0)
                c.close()
                counters["allocations"] += 1
            except TurnClientError:
                counters["failures"] += 1
            i += 1
            await asyncio.sleep(max(0.0, 1 / args.churn - (time.monotonic() - started)))

    async def stream(n: int) -> None:
        c = await client(f"stream{n}")
        await c.allocate()
        await c.channel_bind(0x4000, peer)
        while time.monotonic() < deadline:
            c.send_channel(0x4000, b"m" * 160)
            try:
                await c.receive(1.0)
                counters["packets"] += 1
            except TurnClientError:
                counters["lost"] += 1
            await asyncio.sleep(0.02)  # 50 packets per second, like a call
        await c.refresh(0)
        c.close()

    samples: list[tuple[float, float, int]] = []

    async def sample() -> None:
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            rss, fds = rss_fds(server.pid)
            samples.append((time.monotonic() - t0, rss, fds))
            print(
                f"{samples[-1][0]:7.1f}s  rss {rss:7.1f} MB  fds {fds:5d}  "
                f"allocations {counters['allocations']:6d}  packets {counters['packets']:7d}  "
                f"lost {counters['lost']}",
                flush=True,
            )
            await asyncio.sleep(args.interval)

    try:
        await asyncio.gather(churn(), sample(), *(stream(n) for n in range(args.streams)))
    finally:
        echo.close()
        server.send_signal(signal.SIGINT)  # stop now; SIGTERM would drain
        server.wait(20)
    if len(samples) < 3:
        print("too short to judge")
        return 1
    warm = samples[len(samples) // 4]
    last = samples[-1]
    rss_growth = (last[1] - warm[1]) / warm[1]
    fd_growth = last[2] - warm[2]
    flat = rss_growth < 0.10 and fd_growth <= 2
    print(
        f"\nafter warm-up: RSS {warm[1]:.1f} -> {last[1]:.1f} MB ({rss_growth:+.1%}), "
        f"fds {warm[2]} -> {last[2]} ({fd_growth:+d}); "
        f"{counters['allocations']} allocations churned, {counters['failures']} failed, "
        f"{counters['packets']} packets relayed, {counters['lost']} lost"
    )
    print("FLAT" if flat else "GROWING")
    return 0 if flat else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--churn", type=float, default=20.0, help="allocations per second")
    parser.add_argument("--streams", type=int, default=10, help="steady relayed streams")
    parser.add_argument("--interval", type=float, default=5.0, help="sampling interval")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
