"""What operating the server costs: the CPU of one /metrics scrape with one worker and
with two (a supervisor merging its workers' samples), and of one TLS handshake with a
P-256 and an RSA-2048 certificate (what the per-source handshake limit bounds),
measured from the kernel's per-thread CPU time (/proc/PID/task/TID/schedstat,
nanoseconds) of every process of the server, less its idle CPU over the same time.

    python benchmarks/ops.py [--out benchmarks/OPERATIONS.md]

Scrapes are paced (one every 0.55 s; the throttle renders at most 4 a second past a
burst of 8): each one is rendered, none shares another's rendering.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from turnserver.testing import free_port, process_tree, serve_command, stop_process, wait_for_stun

SCRAPES = 40
GAP = 0.55


def cpu_ns(pids: list[int]) -> int:
    """CPU time of every thread of these processes, in nanoseconds."""
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except OSError:
            pass
    return total


def scrape_cost(workers: int) -> tuple[float, list[float]]:
    """(ms of CPU per scrape, all processes together; per process) for a server with
    `workers` workers, idle CPU subtracted."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    cmd = serve_command(
        port,
        "--secret",
        "ops-secret",
        "--probe-interval",
        "0",
        workers=workers,
        metrics=f"127.0.0.1:{mport}",
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_stun(proc, port)
        url = f"http://127.0.0.1:{mport}/metrics"
        for _ in range(50):
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(2.0)
        pids = process_tree(proc.pid)
        before = [cpu_ns([p]) for p in pids]
        started = time.monotonic()
        time.sleep(8.0)
        idle_elapsed = time.monotonic() - started
        idle = [(cpu_ns([p]) - b) / idle_elapsed for p, b in zip(pids, before, strict=True)]
        before = [cpu_ns([p]) for p in pids]
        started = time.monotonic()
        for _ in range(SCRAPES):
            urllib.request.urlopen(url, timeout=5).read()
            time.sleep(GAP)
        elapsed = time.monotonic() - started
        after = [cpu_ns([p]) for p in pids]
        per = [
            max(0.0, (a - b - i * elapsed) / SCRAPES / 1e6)
            for a, b, i in zip(after, before, idle, strict=True)
        ]
        return sum(per), per
    finally:
        stop_process(proc)


HANDSHAKES = 300


def _certificate(directory: Path, kind: str) -> tuple[str, str]:
    """A self-signed certificate with a P-256 or an RSA-2048 key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "p256"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{kind}.pem", directory / f"{kind}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


def handshake_cost(kind: str) -> float:
    """Server CPU per TLS handshake (ms), the per-source limit lifted for the count."""
    import ssl
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="turnserver-ops-"))
    cert, key = _certificate(directory, kind)
    (directory / "c.yaml").write_text("stream:\n  tls_handshake_rate: 0\n")
    port, tls = free_port(), free_port(socket.SOCK_STREAM)
    cmd = serve_command(
        port,
        "--secret",
        "ops-secret",
        "--probe-interval",
        "0",
        "--cert",
        cert,
        "--key",
        key,
        "--config",
        str(directory / "c.yaml"),
        tls_port=tls,
        workers=1,
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        wait_for_stun(proc, port)
        time.sleep(1.0)
        pids = process_tree(proc.pid)
        before, started = cpu_ns(pids), time.monotonic()
        time.sleep(3.0)
        idle = (cpu_ns(pids) - before) / (time.monotonic() - started)
        before, started = cpu_ns(pids), time.monotonic()
        for _ in range(HANDSHAKES):
            with (
                socket.create_connection(("127.0.0.1", tls)) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost"),
            ):
                pass
        elapsed = time.monotonic() - started
        return (cpu_ns(pids) - before - idle * elapsed) / HANDSHAKES / 1e6
    finally:
        stop_process(proc)


def handshake_rows() -> list[str]:
    p256, rsa2048 = handshake_cost("p256"), handshake_cost("rsa")
    return [
        "## Operations: the server CPU of one TLS handshake",
        "",
        f"- P-256 certificate: {p256:.2f} ms; RSA-2048: {rsa2048:.2f} ms",
        "- the per-source limit (stream.tls_handshake_rate 50/s past a burst of 200) bounds "
        f"what one address can make the server spend: {50 * rsa2048:.0f} ms of CPU a "
        "second with RSA-2048",
    ]


def scrape_rows(repeats: int = 3) -> list[str]:
    """The report's lines: medians of `repeats` runs."""
    results: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for workers in (1, 2):
            results[workers].append(scrape_cost(workers)[0])
    one = sorted(results[1])[len(results[1]) // 2]
    two = sorted(results[2])[len(results[2]) // 2]
    return [
        "## Operations: the CPU of one /metrics scrape",
        "",
        f"- one worker: {one:.2f} ms (runs: {', '.join(f'{v:.2f}' for v in results[1])})",
        f"- two workers, merged by the supervisor: {two:.2f} ms, {two / one:.2f}x one worker "
        f"(runs: {', '.join(f'{v:.2f}' for v in results[2])})",
        "- a flood of scrapes renders at most 4 times a second past a burst of 8 (later "
        "requests wait for the next rendering and share it): at most "
        f"{4 * two:.1f} ms of CPU a second with two workers",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent / "OPERATIONS.md"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lines = [
        f"# Operations costs ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        "Method: benchmarks/ops.py (its docstring).",
        "",
        *scrape_rows(args.repeats),
        "",
        *handshake_rows(),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
