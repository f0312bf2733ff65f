"""The server never relays into itself: in a network namespace the test
creates, a host with two addresses on one interface and a wildcard listener, clients of
the default worker count try the second address, the server's own ports, loopback and
an address added while they run; two clients of the server still reach each other."""

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

SECRET = "self-relay-secret"
HERE = Path(__file__).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=True)


def _require_netns() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (ip netns)"
    elif not shutil.which("ip"):
        reason = "needs iproute2 (.ci/run installs it)"
    if reason:
        missing(reason)


def test_no_relay_into_the_host_itself(tmp_path: Path) -> None:
    _require_netns()
    ns = f"tself{os.getpid() % 100000}"
    metrics_port = 9641
    _run("ip", "netns", "add", ns)
    server: subprocess.Popen[bytes] | None = None
    log_path = tmp_path / "server.log"
    try:

        def inside(*cmd: str) -> subprocess.CompletedProcess[str]:
            return _run("ip", "netns", "exec", ns, *cmd)

        inside("ip", "link", "set", "lo", "up")
        inside("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        inside("ip", "link", "set", "d0", "up")
        inside("ip", "link", "set", "d1", "up")
        inside("ip", "addr", "add", "198.51.200.1/24", "dev", "d0")
        inside("ip", "addr", "add", "198.51.200.2/24", "dev", "d0")  # a second address
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
                    "udp://0.0.0.0:3478",
                    "--listen",
                    "tcp://0.0.0.0:3478",
                    "--relay-ip",
                    "198.51.200.1",
                    "--secret",
                    SECRET,
                    "--probe-interval",
                    "0",
                    "--metrics-listen",
                    f"198.51.200.1:{metrics_port}",
                    "--log-level",
                    "info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while "workers serving" not in log_path.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        done = inside(sys.executable, str(HERE / "self_relay_client.py"), SECRET, str(metrics_port))
        report = json.loads(done.stdout)
        assert report["second_address"] == 403, report
        assert report["own_listener"] == 403 and report["own_metrics"] == 403, report
        assert report["relay_outside_range"] == 403, report
        assert report["loopback_listener"] == 403, report
        assert report["mapped_loopback"] in (403, 443), report  # no IPv6 relay: 443
        assert report["relay_to_relay"] == 0 and report["b_received"] == "hello b", report
        assert report["before_added"] == 0 and report["after_added"] == 403, report
        assert report["added_refused_after"] < 1.5, report
        assert report["connect_metrics"] == 403, report
        metrics = inside(
            sys.executable,
            "-c",
            "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
            f"'http://198.51.200.1:{metrics_port}/metrics').read().decode())",
        ).stdout
        counts = {
            r: float(v)
            for r, v in re.findall(r'turn_peer_denied_total\{reason="(\w+)"\} (\S+)', metrics)
        }
        assert counts["host_address"] >= 2 and counts["own_port"] >= 4, counts
        log = log_path.read_text()
        assert re.search(r"permission revoked .*peer=198\.51\.200\.9 reason=host_address", log)
        assert "Traceback" not in log
    finally:
        if server is not None:
            from turnserver.testing import stop_process

            stop_process(server)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
