"""A network lab in namespaces: a client and a peer, each behind its own NAT router, and
our TURN server on a shared "public" bridge. Addresses exist only inside the lab.

    c (10.1.0.2) -- natc (10.1.0.1 | 198.18.0.2) --+
                                                   br0 (ns pub) -- srv (198.18.0.1, .11)
    p (10.2.0.2) -- natp (10.2.0.1 | 198.18.0.3) --+
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

# iptables: let replies to connections from the inside back in
ESTABLISHED_ACCEPT = ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


class Lab:
    """Creates the namespaces and links; `close()` removes everything."""

    def __init__(self) -> None:
        self.prefix = f"tl{os.getpid() % 10000}"
        self.names = {n: f"{self.prefix}-{n}" for n in ("pub", "srv", "natc", "c", "natp", "p")}
        self.created: list[str] = []
        self._links = 0

    def ns(self, name: str) -> str:
        return self.names[name]

    def run(self, name: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns(name), *cmd, check=check)

    def popen(self, name: str, cmd: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(name), *cmd], text=True, **kw)  # type: ignore[call-overload]

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        self._links += 1
        tmp_a, tmp_b = f"{self.prefix}a{self._links}", f"{self.prefix}b{self._links}"
        sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        sh("ip", "link", "set", tmp_a, "netns", self.ns(a))
        sh("ip", "link", "set", tmp_b, "netns", self.ns(b))
        self.run(a, "ip", "link", "set", tmp_a, "name", a_if)
        self.run(b, "ip", "link", "set", tmp_b, "name", b_if)
        self.run(a, "ip", "link", "set", a_if, "up")
        self.run(b, "ip", "link", "set", b_if, "up")

    def build(self) -> None:
        for name in self.names:
            sh("ip", "netns", "add", self.ns(name))
            self.created.append(name)
            self.run(name, "ip", "link", "set", "lo", "up")
        self.run("pub", "ip", "link", "add", "br0", "type", "bridge")
        self.run("pub", "ip", "link", "set", "br0", "up")
        for name, addr in (
            ("srv", "198.18.0.1/24"),
            ("natc", "198.18.0.2/24"),
            ("natp", "198.18.0.3/24"),
        ):
            self._veth(name, "pub0", "pub", f"to{name}")
            self.run("pub", "ip", "link", "set", f"to{name}", "master", "br0")
            self.run(name, "ip", "addr", "add", addr, "dev", "pub0")
        self.run("srv", "ip", "addr", "add", "198.18.0.11/24", "dev", "pub0")
        for host, router, lan in (("c", "natc", "10.1.0"), ("p", "natp", "10.2.0")):
            self._veth(host, "lan0", router, "lan0")
            self.run(host, "ip", "addr", "add", f"{lan}.2/24", "dev", "lan0")
            self.run(router, "ip", "addr", "add", f"{lan}.1/24", "dev", "lan0")
            self.run(host, "ip", "route", "add", "default", "via", f"{lan}.1")
            self.run(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def nat(self, router: str, *, symmetric: bool = False) -> None:
        """MASQUERADE out of the public side; symmetric: a new random port per flow."""
        self.run(router, "iptables", "-t", "nat", "-F")
        extra = ["--random-fully"] if symmetric else []
        self.run(
            router,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "pub0",
            "-j",
            "MASQUERADE",
            *extra,
        )
        # Like a real NAT: unsolicited packets from outside vanish (no ICMP unreachable)
        self.run(router, "iptables", "-F", "INPUT")
        self.run(router, "iptables", "-A", "INPUT", "-i", "pub0", *ESTABLISHED_ACCEPT)
        self.run(router, "iptables", "-A", "INPUT", "-i", "pub0", "-j", "DROP")

    def firewall(self, router: str, rules: str) -> None:
        """'open', 'drop-udp' or 'tls-only' (TCP 443 and 5349 out, nothing else)."""
        self.run(router, "iptables", "-F", "FORWARD")
        self.run(router, "iptables", "-P", "FORWARD", "ACCEPT")
        if rules == "drop-udp":
            self.run(router, "iptables", "-A", "FORWARD", "-i", "lan0", "-p", "udp", "-j", "DROP")
        elif rules == "tls-only":
            self.run(router, "iptables", "-A", "FORWARD", *ESTABLISHED_ACCEPT)
            self.run(
                router,
                "iptables",
                "-A",
                "FORWARD",
                "-i",
                "lan0",
                "-p",
                "tcp",
                "-m",
                "multiport",
                "--dports",
                "443,5349",
                "-j",
                "ACCEPT",
            )
            self.run(router, "iptables", "-A", "FORWARD", "-j", "DROP")

    def close(self) -> None:
        for name in reversed(self.created):
            sh("ip", "netns", "del", self.ns(name), check=False)
        self.created.clear()
