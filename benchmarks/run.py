"""Benchmarks: our server and coturn under the same offered load, one after the other.

    python benchmarks/run.py [--quick] [--out benchmarks/RESULTS.md]

1. Relay cost: server CPU microseconds per relayed packet (from /proc/PID/stat of the
   server and its workers) at fixed rates of 160-byte ChannelData through a UDP echo peer
   (coturn's turnutils_peer, in C), with loss and RTT p50/p99.
2. Capacity: the highest offered rate with under 0.1 % loss.
3. Allocation setup rate: full 401 -> Allocate -> CreatePermission -> ChannelBind per second.
4. Memory: RSS per live allocation with 1,000 and 10,000 allocations.
5. Workers: with 2 workers and 50 clients, each worker's share of the relayed packets.

The load generator's own CPU is reported; where it is saturated the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import LoadGen

from turnserver.stun import MessageClass, Method, decode_message, encode_message
from turnserver.testing import free_port, process_tree, rss_bytes, serve_command

SECRET = "bench-secret"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / TICK


def stun_ping(addr: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12)), addr)
            return decode_message(s.recvfrom(2048)[0]).message_class == MessageClass.SUCCESS
        except OSError:
            return False


@dataclass
class Target:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int = 0

    def stop(self) -> None:
        self.proc.send_signal(2)  # SIGINT: stop now, no drain
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_ours(workers: int) -> Target:
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen(
        serve_command(
            port,
            "--secret",
            SECRET,
            "--realm",
            "bench",
            "--allow-loopback-peers",
            "--min-port",
            "40000",
            "--max-port",
            "60000",
            "--probe-interval",
            "0",
            "--log-level",
            "error",
            "--config",
            str(Path(__file__).parent / "bench.yaml"),
            workers=workers,
            metrics=f"127.0.0.1:{mport}",
        ),
        stdout=subprocess.DEVNULL,
    )
    return _wait(
        Target(f"turnserver ({workers} worker{'s' if workers > 1 else ''})", proc, port, mport)
    )


def start_coturn(threads: int | None) -> Target | None:
    exe = shutil.which("turnserver") if shutil.which("turnutils_uclient") else None
    if exe is None:
        return None
    port = free_port()
    args = [
        exe,
        "-n",
        "--listening-ip=127.0.0.1",
        f"--listening-port={port}",
        "--relay-ip=127.0.0.1",
        "--min-port=40000",
        "--max-port=60000",
        "--use-auth-secret",
        f"--static-auth-secret={SECRET}",
        "--realm=bench",
        "--allow-loopback-peers",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--no-tcp-relay",
        "--log-file=/dev/null",
        "--no-stdout-log",
    ]
    if threads:
        args.append(f"--relay-threads={threads}")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = f"coturn ({threads} relay thread)" if threads else "coturn (default threads)"
    return _wait(Target(name, proc, port))


def _wait(t: Target) -> Target:
    deadline = time.monotonic() + 20
    while not stun_ping(("127.0.0.1", t.port)):
        if t.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{t.name} did not start")
        time.sleep(0.1)
    return t


@dataclass
class RateResult:
    offered: int
    sent: int
    received: int
    server_us_per_packet: float
    loss: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu: float


def run_rate(t: Target, gen: LoadGen, clients: list, rate: int, seconds: float) -> RateResult:
    c0, g0, w0 = cpu_seconds(t.proc.pid), time.process_time(), time.monotonic()
    sent, received, rtts = gen.traffic(clients, rate, seconds)
    c1, g1, w1 = cpu_seconds(t.proc.pid), time.process_time(), time.monotonic()
    relayed = sent + received  # client->peer and peer->client
    rtts.sort()
    pick = (
        (lambda q: rtts[min(len(rtts) - 1, int(q * len(rtts)))] * 1000)
        if rtts
        else (lambda q: float("nan"))
    )
    return RateResult(
        rate,
        sent,
        received,
        (c1 - c0) * 1e6 / max(1, relayed),
        1 - received / max(1, sent),
        pick(0.5),
        pick(0.99),
        (g1 - g0) / (w1 - w0),
    )


def measure(
    t: Target,
    peer: tuple[str, int],
    rates: list[int],
    seconds: float,
    capacity_rates: list[int],
    setups: int,
    memory_counts: list[int],
) -> dict:
    out: dict = {"name": t.name}
    gen = LoadGen(("127.0.0.1", t.port), SECRET, peer)
    try:
        res = gen.setup(50, prefix="traffic")
        clients = res.ready
        gen.traffic(clients, 2000, 1.0)  # warm up
        out["rates"] = [run_rate(t, gen, clients, r, seconds) for r in rates]
        best = None
        for r in capacity_rates:
            rr = run_rate(t, gen, clients, r, seconds)
            if rr.loss >= 0.001:
                out["capacity_limit"] = rr
                break
            best = rr
        out["capacity"] = best
        s = gen.setup(setups, prefix="setup")
        out["setup_rate"] = len(s.ready) / s.seconds if s.seconds else 0
        out["setup_failed"] = s.failed
    finally:
        gen.close()
    # Memory on a fresh instance of the same server would be cleaner; this one has the
    # setup allocations too, so measure increments.
    gen = LoadGen(("127.0.0.1", t.port), SECRET, peer)
    try:
        out["memory"] = []
        base = rss_bytes(t.proc.pid)
        have = 0
        for count in memory_counts:
            r = gen.setup(count - have, prefix=f"mem{have}-", window=512)
            have += len(r.ready)
            gen.refresh_all()
            time.sleep(0.5)
            out["memory"].append((have, (rss_bytes(t.proc.pid) - base) / max(1, have)))
    finally:
        gen.close()
    return out


def worker_spread(peer: tuple[str, int], seconds: float) -> dict:
    t = start_ours(2)
    try:
        time.sleep(1)
        gen = LoadGen(("127.0.0.1", t.port), SECRET, peer)
        clients = gen.setup(50, prefix="spread").ready
        rr = run_rate(t, gen, clients, 10000, seconds)
        gen.close()
        body = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{t.metrics_port}/readyz", timeout=5).read()
        )
        shares = []
        for w in body["workers"].values():
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{w['metrics_port']}/metrics", timeout=5)
                .read()
                .decode()
            )
            shares.append(
                sum(
                    float(line.split()[-1])
                    for line in text.splitlines()
                    if line.startswith("turn_relayed_packets_total")
                )
            )
        total = sum(shares) or 1
        return {"rate": rr, "shares": [s / total for s in shares]}
    finally:
        t.stop()


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()} x {model}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def fmt_rows(results: list[dict], rates: list[int]) -> list[str]:
    ours = results[0]
    lines = [
        "| server | " + " | ".join(f"{r} pps offered" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for res in results:
        cells = []
        for rr, base in zip(res["rates"], ours["rates"], strict=True):
            sat = " (load generator saturated)" if rr.loadgen_cpu > 0.95 else ""
            cells.append(
                f"{rr.server_us_per_packet:.1f} µs/pkt, loss {rr.loss:.2%}, "
                f"RTT p50 {rr.p50_ms:.2f} / p99 {rr.p99_ms:.2f} ms, "
                f"loadgen CPU {rr.loadgen_cpu:.0%}{sat}"
            )
            del base
        lines.append(f"| {res['name']} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs, 1,000 allocations")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seconds = 2.0 if args.quick else 4.0
    rates = [5000, 10000, 20000]
    capacity_rates = [10000, 20000, 30000, 40000, 50000]
    memory_counts = [1000] if args.quick else [1000, 10000]
    peer_exe = shutil.which("turnutils_peer")
    if peer_exe is None:
        print("turnutils_peer (Debian package coturn) is needed as the echo peer")
        return 2
    peer_port = free_port()
    peer = subprocess.Popen(
        [peer_exe, "-L", "127.0.0.1", "-p", str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    results = []
    try:
        for start in (lambda: start_ours(1), lambda: start_coturn(1)):
            t = start()
            if t is None:
                print("coturn is not installed (apt-get install coturn): ours only")
                continue
            print(f"measuring {t.name} ...", flush=True)
            try:
                results.append(
                    measure(
                        t,
                        ("127.0.0.1", peer_port),
                        rates,
                        seconds,
                        capacity_rates,
                        2000,
                        memory_counts,
                    )
                )
            finally:
                t.stop()
        print("measuring 2 workers ...", flush=True)
        spread = worker_spread(("127.0.0.1", peer_port), seconds)
    finally:
        peer.terminate()
        peer.wait()
    lines = [
        f"# Benchmark results ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Load: 50 clients, 160-byte ChannelData through "
        "turnutils_peer on loopback; the load generator shares the machine.",
        "",
        "## 1. Relay cost (server CPU per relayed packet, both directions counted)",
        "",
    ]
    lines += fmt_rows(results, rates)
    if len(results) == 2:
        lines += [
            "",
            "Ratio ours / coturn (CPU per packet): "
            + ", ".join(
                f"{r}: {a.server_us_per_packet / b.server_us_per_packet:.2f}x"
                for r, a, b in zip(rates, results[0]["rates"], results[1]["rates"], strict=True)
            ),
        ]
    lines += ["", "## 2. Capacity (highest offered rate with < 0.1 % loss)", ""]
    for res in results:
        cap = res["capacity"]
        limit = res.get("capacity_limit")
        note = ""
        if limit is not None and limit.loadgen_cpu > 0.95:
            note = " (the load generator saturated first at the next step)"
        elif limit is None:
            note = " (the highest rate tried)"
        lines.append(
            f"- {res['name']}: {cap.offered if cap else 0} pps offered, "
            f"{cap.server_us_per_packet if cap else 0:.1f} µs/pkt{note}"
        )
    lines += ["", "## 3. Allocation setup rate (401, Allocate, CreatePermission, ChannelBind)", ""]
    for res in results:
        lines.append(
            f"- {res['name']}: {res['setup_rate']:.0f} setups/s ({res['setup_failed']} failed)"
        )
    if len(results) == 2:
        ratio = results[0]["setup_rate"] / max(1, results[1]["setup_rate"])
        lines.append(f"- ratio ours / coturn: {ratio:.2f}x")
    lines += ["", "## 4. Memory (RSS growth per live allocation)", ""]
    for res in results:
        lines.append(
            f"- {res['name']}: "
            + ", ".join(f"{n} allocations: {per / 1024:.1f} kB each" for n, per in res["memory"])
        )
    lines += [
        "",
        "## 5. Two workers, 50 clients, 10,000 pps offered",
        "",
        "- share of relayed packets per worker: " + ", ".join(f"{s:.0%}" for s in spread["shares"]),
        f"- CPU per packet (all workers): {spread['rate'].server_us_per_packet:.1f} µs, "
        f"loss {spread['rate'].loss:.2%}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
