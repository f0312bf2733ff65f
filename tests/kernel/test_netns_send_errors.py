"""Send errors from real routes inside a network namespace the test creates: a veth
with MTU 1280 and DONT-FRAGMENT (EMSGSIZE), and unreachable, prohibit and blackhole
routes. No send error ends an allocation or logs a traceback; each is counted and
logged once per allocation and errno."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.support.server import missing

SECRET = "netns-secret"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=True)


def _possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if not shutil.which("ip"):
        return "needs iproute2 (.ci/run installs it)"
    return None


def test_route_and_mtu_send_errors_are_counted_not_fatal(tmp_path: Path) -> None:
    reason = _possible()
    if reason:
        missing(reason)
    ns = f"tsend{os.getpid() % 100000}"
    _run("ip", "netns", "add", ns)
    server = None
    try:

        def inside(*cmd: str) -> subprocess.CompletedProcess[str]:
            return _run("ip", "netns", "exec", ns, *cmd)

        inside("ip", "link", "set", "lo", "up")
        inside("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        inside("ip", "link", "set", "v0", "mtu", "1280", "up")
        inside("ip", "link", "set", "v1", "mtu", "1280", "up")
        inside("ip", "addr", "add", "192.0.2.1/24", "dev", "v0")
        inside("ip", "route", "add", "unreachable", "198.51.100.0/24")
        inside("ip", "route", "add", "prohibit", "203.0.113.0/24")
        inside("ip", "route", "add", "blackhole", "198.18.5.0/24")
        log_path = tmp_path / "server.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    sys.executable,
                    "-m",
                    "turnserver",
                    "serve",
                    "--listen",
                    "udp://192.0.2.1:3478",
                    "--listen",
                    "tcp://192.0.2.1:3478",
                    "--relay-ip",
                    "192.0.2.1",
                    "--secret",
                    SECRET,
                    "--workers",
                    "1",
                    "--metrics-listen",
                    "127.0.0.1:9641",
                    "--probe-interval",
                    "0",
                    "--allow-peer",
                    "192.0.2.0/24",
                    "--allow-peer",
                    "198.51.100.0/24",
                    "--allow-peer",
                    "203.0.113.0/24",
                    "--allow-peer",
                    "198.18.0.0/15",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while b"listening on" not in log_path.read_bytes():
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        client = inside(
            sys.executable,
            str(Path(__file__).with_name("netns_send_errors_client.py")),
            "3478",
            SECRET,
        )
        report = json.loads(client.stdout.strip().splitlines()[-1])
        assert [r["refresh"] for r in report] == [600, 600]
        metrics = inside(
            sys.executable,
            "-c",
            "import urllib.request;print(urllib.request.urlopen("
            "'http://127.0.0.1:9641/metrics').read().decode())",
        ).stdout
        dropped = re.search(r'turn_dropped_packets_total\{reason="send_error"\} (\S+)', metrics)
        assert dropped and float(dropped.group(1)) >= 2 * 200 * 4
        text = log_path.read_text()
        assert "Traceback" not in text
        assert "connection closed" not in text  # the server closed no connection
        lines = [ln for ln in text.splitlines() if "relay send failed" in ln]
        errnos = {re.search(r"errno=(\w+)", ln).group(1) for ln in lines}  # type: ignore[union-attr]
        assert {"EMSGSIZE", "EACCES", "EINVAL"} <= errnos, lines
        assert errnos & {"EHOSTUNREACH", "ENETUNREACH"}, lines
        # once per allocation and errno: 2 allocations x 4 errnos at most
        assert len(lines) <= 2 * len(errnos), lines
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
