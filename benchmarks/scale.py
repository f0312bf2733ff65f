"""Scale: many concurrent allocations on one server process (issue 33 item 3).

    python benchmarks/scale.py --allocations 50000 [--out benchmarks/SCALE.md]

Allocates N UDP allocations (401, then Allocate with the long-term credential) from N
client sockets on 127.0.0.2-127.0.0.9, keeps them, and measures the server: CPU per setup,
setups per second, resident memory per allocation, the CPU its timers cost per second
while nothing happens, and what one /metrics scrape costs (wall time and server CPU).
Then Refresh 0 for every allocation and the memory that came back. One relay IP with a
wide port range (10000-65535): 55,536 relay ports. Needs a raised RLIMIT_NOFILE (root
raises it; otherwise N is capped by the limit). Every loop is bounded by N and a
per-step timeout; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_message
from turnserver.stun.message import long_term_key
from turnserver.testing import free_port, rss_bytes, serve_command, stop_process

USER, PASSWORD, REALM = "scale", "scale-password", "scale.example"
BATCH = 1000
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and its reaped children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


def _raise_nofile(n: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, n)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        want = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return want


def _exchange(socks: list[socket.socket], make: Callable[[int], bytes], server: Any) -> list[Any]:
    """Send one request on each socket, then read each answer (1 s each at most)."""
    for i, s in enumerate(socks):
        s.sendto(make(i), server)
    out = []
    for s in socks:
        try:
            out.append(decode_message(s.recv(2048)))
        except OSError:
            out.append(None)
    return out


def allocate_all(socks: list[socket.socket], server: Any) -> tuple[int, list[Any]]:
    key = long_term_key(USER, REALM, PASSWORD)
    attrs = [(Attr.REQUESTED_TRANSPORT, 17), (Attr.LIFETIME, 3600)]
    challenges = _exchange(
        socks,
        lambda i: encode_message(Method.ALLOCATE, MessageClass.REQUEST, os.urandom(12), attrs),
        server,
    )
    nonces = [c.get(Attr.NONCE) if c is not None else b"" for c in challenges]

    def allocate(i: int) -> bytes:
        full = [*attrs, (Attr.USERNAME, USER), (Attr.REALM, REALM), (Attr.NONCE, nonces[i])]
        return encode_message(
            Method.ALLOCATE, MessageClass.REQUEST, os.urandom(12), full, integrity_key=key
        )

    answers = _exchange(socks, allocate, server)
    ok = sum(1 for a in answers if a is not None and a.message_class == MessageClass.SUCCESS)
    return ok, nonces


def release_all(socks: list[socket.socket], nonces: list[Any], server: Any) -> int:
    key = long_term_key(USER, REALM, PASSWORD)

    def refresh(i: int) -> bytes:
        full = [
            (Attr.LIFETIME, 0),
            (Attr.USERNAME, USER),
            (Attr.REALM, REALM),
            (Attr.NONCE, nonces[i]),
        ]
        return encode_message(
            Method.REFRESH, MessageClass.REQUEST, os.urandom(12), full, integrity_key=key
        )

    answers = _exchange(socks, refresh, server)
    return sum(1 for a in answers if a is not None and a.message_class == MessageClass.SUCCESS)


def scrape(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()
    return time.perf_counter() - started


def run(n: int, out: Path | None) -> int:
    limit = _raise_nofile(n + 10_000)
    n = min(n, limit - 10_000) if limit < n + 10_000 else n
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    cmd = serve_command(
        port,
        "--realm", REALM,
        "--user", f"{USER}:{PASSWORD}",
        "--relay-ip", "127.0.0.1",
        "--min-port", "10000",
        "--max-port", "65535",
        "--probe-interval", "0",
        "--log-level", "warning",
        metrics=f"127.0.0.1:{mport}",
    )  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True)
    server = ("127.0.0.1", port)
    metrics = f"http://127.0.0.1:{mport}/metrics"
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                scrape(metrics)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
        time.sleep(0.5)
        rss0, cpu0 = rss_bytes(proc.pid), cpu_seconds(proc.pid)
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # 250 clients an address: the server answers at most a burst of 2,000
            # challenges (401) a second per client address (core.challenge_burst)
            host = 2 + i // 250
            s.bind((f"127.0.{host // 250}.{2 + host % 250}", 0))
            s.settimeout(1.0)
            socks.append(s)
        started = time.perf_counter()
        allocated, nonces = 0, []
        for b in range(0, n, BATCH):
            ok, batch_nonces = allocate_all(socks[b : b + BATCH], server)
            allocated += ok
            nonces += batch_nonces
        took = time.perf_counter() - started
        cpu1 = cpu_seconds(proc.pid)
        time.sleep(2)
        rss1 = rss_bytes(proc.pid)
        cpu_idle0 = cpu_seconds(proc.pid)
        time.sleep(10)
        idle = (cpu_seconds(proc.pid) - cpu_idle0) / 10
        walls, cpus = [], []
        for _ in range(5):
            c0 = cpu_seconds(proc.pid)
            walls.append(scrape(metrics))
            cpus.append(cpu_seconds(proc.pid) - c0)
        released = 0
        for b in range(0, n, BATCH):
            released += release_all(socks[b : b + BATCH], nonces[b : b + BATCH], server)
        time.sleep(2)
        rss2 = rss_bytes(proc.pid)
    finally:
        for s in socks:
            s.close()
        stop_process(proc)
    per_alloc = (rss1 - rss0) / max(allocated, 1)
    lines = [
        f"# Scale: {allocated:,} concurrent UDP allocations, one process",
        "",
        f"- allocations made: {allocated:,} of {n:,} in {took:.1f} s "
        f"({allocated / took:,.0f} setups/s; 401 and Allocate, {BATCH} in flight)",
        f"- server CPU per setup: {(cpu1 - cpu0) / max(allocated, 1) * 1e6:.0f} µs",
        f"- resident memory: {rss0 / 2**20:.1f} MB idle, {rss1 / 2**20:.1f} MB with the "
        f"allocations: {per_alloc / 1024:.2f} kB per allocation",
        f"- timers and housekeeping with nothing happening: {idle * 100:.2f} % of a core",
        f"- one /metrics scrape: {statistics.median(walls) * 1000:.1f} ms wall, "
        f"{statistics.median(cpus) * 1000:.0f} ms server CPU (medians of 5; CPU in "
        f"{1000 / TICKS:.0f} ms ticks)",
        f"- after Refresh 0 for all ({released:,} answered): {rss2 / 2**20:.1f} MB resident",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)
    return 0 if allocated == n else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--allocations", type=int, default=50_000)
    parser.add_argument("--out", type=Path, help="write the figures here (Markdown)")
    args = parser.parse_args()
    return run(args.allocations, args.out)


if __name__ == "__main__":
    sys.exit(main())
