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
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import LoadGen, next_source, rest_credential

from turnserver.stun import MessageClass, Method, decode_message, encode_message, long_term_key
from turnserver.testing import free_port, process_tree, rss_bytes, serve_command

SECRET = "bench-secret"
REALM = "bench"
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


PEER_PID = [0]  # the echo peer's process, set by main()


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


def start_ours(workers: int, log: Path, *extra: str) -> Target:
    """Our server as shipped: default log level and settings; the log goes to a file."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    name = f"turnserver ({workers} worker{'s' if workers > 1 else ''})"
    if "--offload" in extra:
        name = "turnserver (1 worker, kernel fast path)"
    with log.open("ab") as err:
        proc = subprocess.Popen(
            serve_command(
                port,
                "--secret",
                SECRET,
                "--realm",
                REALM,
                "--allow-loopback-peers",
                "--min-port",
                "40000",
                "--max-port",
                "47999",
                *extra,
                workers=workers,
                metrics=f"127.0.0.1:{mport}",
            ),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return _wait(Target(name, proc, port, mport))


def start_coturn(threads: int, workdir: Path) -> Target | None:
    """coturn as in issue 15's method: defaults plus what a loopback bench needs."""
    exe = shutil.which("turnserver") if shutil.which("turnutils_uclient") else None
    if exe is None:
        return None
    port = free_port()
    userdb = workdir / f"coturn-{port}.db"
    args = [
        exe,
        "-n",
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        f"--listening-port={port}",
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "--min-port=40000",
        "--max-port=47999",
        "--use-auth-secret",
        f"--static-auth-secret={SECRET}",
        f"--realm={REALM}",
        "--allow-loopback-peers",
        "--no-cli",
        f"--relay-threads={threads}",
        f"--userdb={userdb}",
        f"--log-file={workdir / 'coturn.log'}",
        "--no-stdout-log",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _wait(Target(f"coturn ({threads} relay thread)", proc, port))


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
    system_us_per_packet: float  # server + generator + echo peer: the whole pipeline
    loss: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu: float


def run_rate(t: Target, pacer: Path, clients: list, rate: int, seconds: float) -> RateResult:
    """Offer `rate` pps of 160-byte ChannelData from the C pacer (sends every 200 µs)."""
    fds = [c.sock.fileno() for c in clients]
    p0, c0, w0 = cpu_seconds(PEER_PID[0]), cpu_seconds(t.proc.pid), time.monotonic()
    out = subprocess.run(
        [str(pacer), str(rate), str(seconds), "200", *map(str, fds)],
        pass_fds=fds,
        capture_output=True,
        check=True,
        timeout=seconds + 30,
    )
    p1, c1, w1 = cpu_seconds(PEER_PID[0]), cpu_seconds(t.proc.pid), time.monotonic()
    r = json.loads(out.stdout)
    relayed = r["sent"] + r["received"]  # client->peer and peer->client
    return RateResult(
        rate,
        r["sent"],
        r["received"],
        (c1 - c0) * 1e6 / max(1, relayed),
        ((c1 - c0) + (p1 - p0) + r["cpu_seconds"]) * 1e6 / max(1, relayed),
        1 - r["received"] / max(1, r["sent"]),
        r["p50_ms"],
        r["p99_ms"],
        r["cpu_seconds"] / (w1 - w0),
    )


@dataclass
class SetupResult:
    setups: int
    failed: int
    per_second: float
    server_us_per_setup: float
    generator_cpu: float  # of one core: the Python generator shares the machine's cores


SETUPGEN: list[Path] = []  # the C setup generator, set by main()


def run_setups(t: Target, peer: tuple[str, int], count: int, prefix: str) -> SetupResult:
    """`count` full setups (401, Allocate, CreatePermission, ChannelBind) from the C
    setup generator, unique users, each from its own loopback address, 50 in flight;
    server CPU per completed setup and setups per second."""
    lines = []
    for i in range(count):
        user, password = rest_credential(SECRET, f"{prefix}{i}")
        key = long_term_key(user, REALM, password).hex()
        lines.append(f"{next_source()} {user} {key}\n")
    c0 = cpu_seconds(t.proc.pid)
    out = subprocess.run(
        [str(SETUPGEN[0]), "127.0.0.1", str(t.port), peer[0], str(peer[1]), "50", "120"],
        input="".join(lines).encode(),
        capture_output=True,
        check=True,
        timeout=150,
    )
    c1 = cpu_seconds(t.proc.pid)
    r = json.loads(out.stdout)
    done, seconds = r["ready"], r["seconds"]
    return SetupResult(
        done,
        r["failed"],
        done / seconds if seconds else 0.0,
        (c1 - c0) * 1e6 / max(1, done),
        r["cpu_seconds"] / seconds if seconds else 0.0,
    )


def median_by(results: list, key: str) -> Any:
    return sorted(results, key=lambda r: getattr(r, key))[len(results) // 2]


def relay_rates(
    t: Target,
    pacer: Path,
    clients: list,
    rates: list[int],
    seconds: float,
    capacity_rates: list[int],
    repeats: int,
) -> dict:
    """CPU per packet at each rate (median of `repeats`), then the highest rate with
    under 0.1 % loss in one of two runs; a 1 s warm-up first (every client's path
    exists)."""
    out: dict = {}
    run_rate(t, pacer, clients, 2000, 1.0)
    out["rates"] = [
        median_by(
            [run_rate(t, pacer, clients, r, seconds) for _ in range(repeats)],
            "server_us_per_packet",
        )
        for r in rates
    ]
    best = None
    for r in capacity_rates:
        rr = run_rate(t, pacer, clients, r, seconds)
        if rr.loss >= 0.001:  # a second run: a transient elsewhere on the VM is no limit
            rr = min(rr, run_rate(t, pacer, clients, r, seconds), key=lambda x: x.loss)
        if rr.loss >= 0.001:
            out["capacity_limit"] = rr
            break
        best = rr
    out["capacity"] = best
    return out


def measure(
    start: Callable[[], Target | None],
    pacer: Path,
    peer: tuple[str, int],
    rates: list[int],
    seconds: float,
    capacity_rates: list[int],
    setups: int,
    memory_counts: list[int],
    repeats: int,
) -> dict | None:
    t = start()
    if t is None:
        return None
    print(f"measuring {t.name} ...", flush=True)
    out: dict = {"name": t.name}
    try:
        gen = LoadGen(("127.0.0.1", t.port), SECRET, peer)
        try:
            clients = gen.setup(50, prefix="traffic").ready
            out.update(relay_rates(t, pacer, clients, rates, seconds, capacity_rates, repeats))
        finally:
            gen.close()
        if setups:
            out["setup"] = median_by(
                [run_setups(t, peer, setups, f"setup{i}-") for i in range(repeats)],
                "server_us_per_setup",
            )
    finally:
        t.stop()
    if not memory_counts:
        return out
    # Memory on a fresh instance: the runs above leave thousands of allocations behind
    t = start()
    assert t is not None
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
        t.stop()
    return out


@dataclass
class _Sock:
    sock: socket.socket


def measure_floor(
    pacer: Path,
    peer: tuple[str, int],
    rates: list[int],
    seconds: float,
    capacity_rates: list[int],
    repeats: int,
) -> dict:
    """The minimal uvloop relay (benchmarks/floor.py) under the same traffic."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "floor.py"), str(port), *map(str, peer)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "ready"
    t = Target("minimal uvloop relay (the floor)", proc, port)
    return _plain_udp(t, ("127.0.0.1", port), pacer, rates, seconds, capacity_rates, repeats)


def measure_direct(
    pacer: Path,
    peer: tuple[str, int],
    rates: list[int],
    seconds: float,
    capacity_rates: list[int],
    repeats: int,
) -> dict:
    """No relay at all: the pacer's sockets connected straight to the echo peer, which
    sends the same 164 bytes back (a ChannelData header and all). What the generator and
    the peer cost, and where they stop keeping up: the ceiling of every row above."""
    # an idle process stands in for the server: its CPU share is 0
    idle = subprocess.Popen(["sleep", "600"])
    t = Target("no relay (generator and echo peer alone)", idle, 0)
    return _plain_udp(t, peer, pacer, rates, seconds, capacity_rates, repeats)


def _plain_udp(
    t: Target,
    to: tuple[str, int],
    pacer: Path,
    rates: list[int],
    seconds: float,
    capacity_rates: list[int],
    repeats: int,
) -> dict:
    """The pacer's traffic from 50 sockets connected to `to`, with no TURN set-up (the
    floor relay, or the echo peer itself); stops `t` at the end."""
    print(f"measuring {t.name} ...", flush=True)
    clients = []
    for _ in range(50):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((next_source(), 0))
        s.connect(to)
        s.setblocking(False)
        clients.append(_Sock(s))
    out: dict = {"name": t.name}
    try:
        out.update(relay_rates(t, pacer, clients, rates, seconds, capacity_rates, repeats))
    finally:
        for c in clients:
            c.sock.close()
        t.stop()
    return out


def worker_shares(t: Target) -> list[float]:
    try:
        raw = urllib.request.urlopen(f"http://127.0.0.1:{t.metrics_port}/readyz", timeout=5).read()
    except urllib.error.HTTPError as exc:  # 503 under load (e.g. a late self-probe): same body
        raw = exc.read()
    body = json.loads(raw)
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
    return [s / total for s in shares]


def two_workers(pacer: Path, peer: tuple[str, int], seconds: float, setups: int, log: Path) -> dict:
    t = start_ours(2, log)
    try:
        gen = LoadGen(("127.0.0.1", t.port), SECRET, peer)
        clients = gen.setup(50, prefix="spread").ready
        rr = run_rate(t, pacer, clients, 20000, seconds)
        gen.close()
        shares = worker_shares(t)
        setup = run_setups(t, peer, setups, "spread-setup")
        return {"rate": rr, "shares": shares, "setup": setup}
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
    lines = [
        "| server | " + " | ".join(f"{r} pps offered" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for res in results:
        cells = []
        for rr in res["rates"]:
            sat = " (load generator saturated)" if rr.loadgen_cpu > 0.95 else ""
            cells.append(
                f"{rr.server_us_per_packet:.1f} µs/pkt (pipeline {rr.system_us_per_packet:.1f}), "
                f"loss {rr.loss:.2%}, "
                f"RTT p50 {rr.p50_ms:.2f} / p99 {rr.p99_ms:.2f} ms, "
                f"generator CPU {rr.loadgen_cpu:.0%}{sat}"
            )
        lines.append(f"| {res['name']} | " + " | ".join(cells) + " |")
    return lines


def build_tools() -> tuple[Path, Path] | None:
    """Compile benchmarks/pacer.c and setupgen.c (a C compiler, and OpenSSL's headers
    for the setup generator's HMAC: apt-get install gcc libssl-dev)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    here = Path(__file__).parent
    tmp = Path(tempfile.gettempdir())
    pacer = tmp / f"turnserver-pacer-{os.getuid()}"
    setupgen = tmp / f"turnserver-setupgen-{os.getuid()}"
    subprocess.run([cc, "-O2", "-pthread", "-o", str(pacer), str(here / "pacer.c")], check=True)
    built = subprocess.run(
        [cc, "-O2", "-o", str(setupgen), str(here / "setupgen.c"), "-lcrypto"], check=False
    )
    if built.returncode != 0:
        return None
    return pacer, setupgen


def offload_possible() -> bool:
    """The kernel fast path can be measured: root, and the BPF object built or buildable."""
    from turnserver.io.kernel.flows import OBJECT
    from turnserver.io.kernel.program import SOURCE, clang_command

    if os.geteuid() != 0:
        print("not root: no kernel fast path row")
        return False
    if not OBJECT.exists() and shutil.which("clang"):
        subprocess.run(clang_command(SOURCE, OBJECT), check=False)
    return OBJECT.exists()


def report(
    results: list[dict],
    two: dict,
    floor: dict,
    offload: dict | None,
    direct: dict,
    rates: list[int],
    repeats: int,
) -> str:
    lines = [
        f"# Benchmark results ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Both servers as shipped (ours: default log level and "
        "settings; coturn: the command in benchmarks/README.md, one relay thread), one after "
        "the other on loopback. Traffic: 50 clients, 160-byte ChannelData from a C pacer "
        "sending every 200 µs, echoed by turnutils_peer; server CPU from /proc of every "
        f"thread and child. Figures are medians of {repeats} runs.",
        "",
        "## 1. Relay cost (server CPU per relayed packet, both directions counted)",
        "",
    ]
    rows = [*results, *([offload] if offload else []), floor, direct]
    lines += fmt_rows(rows, rates)
    if len(results) == 2:
        lines += [
            "",
            "Ratio ours / the floor (CPU per packet): "
            + ", ".join(
                f"{r}: {a.server_us_per_packet / b.server_us_per_packet:.2f}x"
                for r, a, b in zip(rates, results[0]["rates"], floor["rates"], strict=True)
            ),
            "",
            "Ratio ours / coturn (CPU per packet): "
            + ", ".join(
                f"{r}: {a.server_us_per_packet / b.server_us_per_packet:.2f}x"
                for r, a, b in zip(rates, results[0]["rates"], results[1]["rates"], strict=True)
            ),
        ]
    if offload and len(results) == 2:
        lines += [
            "",
            "Kernel fast path / coturn, CPU per packet (the server's own; and the whole "
            "pipeline's, server + generator + echo peer, since the kernel relays in the "
            "sending process's context): "
            + ", ".join(
                f"{r}: {a.server_us_per_packet / b.server_us_per_packet:.2f}x "
                f"(pipeline {a.system_us_per_packet / b.system_us_per_packet:.2f}x)"
                for r, a, b in zip(rates, offload["rates"], results[1]["rates"], strict=True)
            ),
            "",
            "What relaying adds to the pipeline's CPU per packet, above the no-relay row "
            "(the generator and the echo peer alone), kernel fast path / coturn: "
            + ", ".join(
                f"{r}: {a.system_us_per_packet - d.system_us_per_packet:.1f} / "
                f"{b.system_us_per_packet - d.system_us_per_packet:.1f} µs"
                for r, a, b, d in zip(
                    rates, offload["rates"], results[1]["rates"], direct["rates"], strict=True
                )
            ),
        ]
    lines += ["", "## 2. Capacity (highest offered rate with < 0.1 % loss, one core)", ""]
    for res in rows:
        cap = res["capacity"]
        limit = res.get("capacity_limit")
        if limit is None:
            note = " (the highest rate tried)"
        else:
            note = f"; at {limit.offered} pps: loss {limit.loss:.2%}"
            if limit.loadgen_cpu > 0.95:
                note += " (the generator saturated)"
        lines.append(
            f"- {res['name']}: {cap.offered if cap else 0} pps offered, "
            f"{cap.server_us_per_packet if cap else 0:.1f} µs/pkt{note}"
        )
    lines += [
        "",
        "## 3. Allocation setup (401, Allocate, CreatePermission, ChannelBind; unique users, "
        "50 in flight)",
        "",
    ]
    for res in results:
        s = res["setup"]
        lines.append(
            f"- {res['name']}: {s.server_us_per_setup:.0f} µs server CPU per setup, "
            f"{s.per_second:.0f} setups/s ({s.failed} failed of {s.setups + s.failed}; "
            f"the generator used {s.generator_cpu:.0%} of a core)"
        )
    if len(results) == 2:
        a, b = results[0]["setup"], results[1]["setup"]
        lines.append(
            "- ratio ours / coturn: CPU per setup "
            f"{a.server_us_per_setup / b.server_us_per_setup:.2f}x, "
            f"setups/s {a.per_second / max(1.0, b.per_second):.2f}x"
        )
    lines += ["", "## 4. Memory (RSS growth per live allocation)", ""]
    for res in results:
        lines.append(
            f"- {res['name']}: "
            + ", ".join(f"{n} allocations: {per / 1024:.1f} kB each" for n, per in res["memory"])
        )
    one = results[0]["setup"]
    lines += [
        "",
        "## 5. Two workers (2 cores)",
        "",
        "- share of relayed packets per worker at 20,000 pps: "
        + ", ".join(f"{s:.0%}" for s in two["shares"]),
        f"- CPU per packet (all workers): {two['rate'].server_us_per_packet:.1f} µs, "
        f"loss {two['rate'].loss:.2%}",
        f"- setups/s: {two['setup'].per_second:.0f} "
        f"({two['setup'].per_second / max(1.0, one.per_second):.2f}x one worker), "
        f"{two['setup'].server_us_per_setup:.0f} µs CPU per setup; the generator used "
        f"{two['setup'].generator_cpu:.0%} of a core, so the workers had at most "
        f"{2 - two['setup'].generator_cpu:.2f} cores",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one run each, 1,000 allocations")
    parser.add_argument("--only", choices=["ours", "coturn"], help="measure one server")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seconds = 3.0 if args.quick else 4.0
    repeats = 1 if args.quick else 3
    rates = [5000, 10000, 20000, 50000]
    capacity_rates = [20000, 30000, 40000, 50000, 60000, 70000, 80000, 100000, 120000, 150000]
    memory_counts = [1000] if args.quick else [1000, 7000]  # the 8,000-port range
    peer_exe = shutil.which("turnutils_peer")
    if peer_exe is None:
        print("turnutils_peer (Debian package coturn) is needed as the echo peer")
        return 2
    tools = build_tools()
    if tools is None:
        print("the load generators need a C compiler and OpenSSL: apt-get install gcc libssl-dev")
        return 2
    pacer, setupgen = tools
    SETUPGEN[:] = [setupgen]
    workdir = Path(tempfile.mkdtemp(prefix="turnserver-bench-"))
    log = workdir / "turnserver.log"
    peer_port = free_port()
    peer = subprocess.Popen(
        [peer_exe, "-L", "127.0.0.1", "-p", str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    PEER_PID[0] = peer.pid
    time.sleep(0.3)
    results = []
    starts: list[Callable[[], Target | None]] = []
    if args.only != "coturn":
        starts.append(lambda: start_ours(1, log))
    if args.only != "ours":
        starts.append(lambda: start_coturn(1, workdir))
    two: dict = {}
    floor: dict = {}
    direct: dict = {}
    offload: dict | None = None
    try:
        for start in starts:
            res = measure(
                start,
                pacer,
                ("127.0.0.1", peer_port),
                rates,
                seconds,
                capacity_rates,
                2000,
                memory_counts,
                repeats,
            )
            if res is None:
                print("coturn is not installed (apt-get install coturn): ours only")
                continue
            results.append(res)
        if args.only is None and offload_possible():
            offload = measure(
                lambda: start_ours(1, log, "--offload", "ebpf"),
                pacer,
                ("127.0.0.1", peer_port),
                rates,
                seconds,
                capacity_rates,
                0,
                [],
                repeats,
            )
        if args.only is None:
            floor = measure_floor(
                pacer, ("127.0.0.1", peer_port), rates, seconds, capacity_rates, repeats
            )
            direct = measure_direct(
                pacer, ("127.0.0.1", peer_port), rates, seconds, capacity_rates, repeats
            )
            print("measuring 2 workers ...", flush=True)
            two = two_workers(pacer, ("127.0.0.1", peer_port), seconds, 2000, log)
    finally:
        peer.terminate()
        peer.wait()
    if not two:
        for res in results:
            s = res["setup"]
            print(
                f"{res['name']}: setup {s.server_us_per_setup:.0f} us CPU, "
                f"{s.per_second:.0f}/s; relay "
                + ", ".join(f"{r.offered}: {r.server_us_per_packet:.1f} us" for r in res["rates"])
                + f"; capacity {res['capacity'].offered if res['capacity'] else 0}"
            )
        return 0
    text = report(results, two, floor, offload, direct, rates, repeats)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
