"""What operating the server costs: the CPU of one /metrics scrape with one worker and
with two (a supervisor merging its workers' samples), measured from the kernel's
per-thread CPU time (/proc/PID/task/TID/schedstat, nanoseconds) of every process of the
server, less its idle CPU over the same time.

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
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
