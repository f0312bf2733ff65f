"""The network lab: ICE between a client and a peer behind NATs and firewalls, with and
without our TURN server, and preflight's verdict from the client's network. Runs as root
with `ip netns`; addresses exist only inside the lab's namespaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netlab import Lab
from tests.support.server import missing
from turnserver.ops.dev.selfsigned import ensure_self_signed
from turnserver.ops.http.credentials import mint

HERE = Path(__file__).parent
SECRET = "lab-secret"
SRV = "198.18.0.1"


def _lab_possible() -> str | None:
    if os.geteuid() != 0:
        return "the network lab needs root (ip netns)"
    if not shutil.which("ip") or not shutil.which("iptables"):
        return "the network lab needs iproute2 and iptables (.ci/run installs them)"
    probe = subprocess.run(["ip", "netns", "add", f"tlprobe{os.getpid()}"], capture_output=True)
    if probe.returncode != 0:
        return f"ip netns is not permitted here: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", f"tlprobe{os.getpid()}"], capture_output=True)
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = _lab_possible()
    if reason:
        missing(reason)
    tmp = tmp_path_factory.mktemp("lab")
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    ensure_self_signed(cert, key, [SRV])
    net = Lab()
    server = None
    try:
        net.build()
        log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below
        server = net.popen(
            "srv",
            [
                sys.executable,
                "-m",
                "turnserver",
                "serve",
                "--listen",
                f"udp://{SRV}:3478",
                "--listen",
                "udp://198.18.0.11:3478",
                "--other-address",
                "198.18.0.11:3478",
                "--listen",
                f"tcp://{SRV}:3478",
                "--listen",
                f"tls://{SRV}:5349",
                "--cert",
                cert,
                "--key",
                key,
                "--relay-ip",
                SRV,
                "--secret",
                SECRET,
                "--allow-peer",
                "198.18.0.0/24",
                "--metrics-listen",
                "off",
                "--probe-interval",
                "0",
                "--workers",
                "1",
                "--min-port",
                "50000",
                "--max-port",
                "50999",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(1.5)
        assert server.poll() is None, (tmp / "server.log").read_text()
        yield net
    finally:
        if server is not None:
            server.terminate()
            server.wait(15)
        net.close()


def ice(lab: Lab, turn_transport: str | None, timeout: float = 12) -> tuple[dict, dict]:
    """aioice between c (controlling) and p; TURN for c over turn_transport, p over UDP."""
    cred = mint(SECRET, "lab", 600, time.time())
    procs = []
    for name, controlling in (("c", True), ("p", False)):
        args: dict[str, object] = {
            "name": name,
            "controlling": controlling,
            "stun": [SRV, 3478],
            "timeout": timeout,
        }
        transport = turn_transport if name == "c" else "udp"
        if turn_transport is not None:
            tls = transport == "tls"
            args["turn"] = {
                "server": [SRV, 5349 if tls else 3478],
                "username": cred.username,
                "password": cred.password,
                "transport": "tcp" if tls else transport,
                "tls": tls,
            }
        procs.append(
            lab.popen(
                name,
                [sys.executable, str(HERE / "lab_ice.py"), json.dumps(args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        offers = [p.stdout.readline() for p in procs]  # type: ignore[union-attr]
        for p, other in zip(procs, reversed(offers), strict=True):
            p.stdin.write(other)  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        results = [
            json.loads(p.stdout.readline() or '{"ok": false, "error": "no output"}')  # type: ignore[union-attr]
            for p in procs
        ]
    finally:
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    return results[0], results[1]


def preflight(lab: Lab) -> dict:
    done = lab.run(
        "c",
        sys.executable,
        "-m",
        "turnserver",
        "preflight",
        "--secret",
        SECRET,
        "--json",
        "--insecure",
        "--packets",
        "10",
        "--timeout",
        "3",
        f"stun:{SRV}:3478",
        f"turn:{SRV}:3478?transport=udp",
        f"turn:{SRV}:3478?transport=tcp",
        f"turns:{SRV}:5349",
        check=False,
    )
    report: dict = json.loads(done.stdout)
    assert (done.returncode == 0) == report["ok"]
    return report


SCENARIOS = {
    # name: (client NAT symmetric, peer NAT symmetric, client firewall, TURN transport,
    #        direct works, preflight working transports, TURN required)
    "open-nat": (False, False, "open", "udp", True, ["udp", "tcp", "tls"], False),
    "symmetric-nat": (True, True, "open", "udp", False, ["udp", "tcp", "tls"], True),
    "udp-blocked": (False, False, "drop-udp", "tcp", False, ["tcp", "tls"], True),
    "tls-only": (False, False, "tls-only", "tls", False, ["tls"], True),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario(lab: Lab, scenario: str) -> None:
    sym_c, sym_p, firewall, transport, direct_ok, working, turn_required = SCENARIOS[scenario]
    lab.nat("natc", symmetric=sym_c)
    lab.nat("natp", symmetric=sym_p)
    lab.firewall("natc", firewall)
    lab.firewall("natp", "open")
    direct_c, _ = ice(lab, None, timeout=8)
    assert direct_c["ok"] is direct_ok, (scenario, direct_c)
    relayed_c, relayed_p = ice(lab, transport)
    assert relayed_c["ok"] and relayed_p["ok"], (scenario, relayed_c, relayed_p)
    if not direct_ok:
        assert "relay" in (relayed_c["local"], relayed_c["remote"]), relayed_c
    report = preflight(lab)
    assert report["working_transports"] == working, (scenario, report)
    assert report["turn_required"] is turn_required, (scenario, report["nat_mapping"])
