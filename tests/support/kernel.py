"""For the kernel tests: what is missing (fail in CI, skip on a laptop) and which of our
programs are attached to an interface in a namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from tests.support.server import missing


def unavailable(why: str) -> NoReturn:
    """Fail in CI (.ci/run provides it), skip with the reason elsewhere."""
    missing(why, f"{why}; .ci/run installs clang, libbpf-dev and runs as root")


def attached_ids(ns: str, dev: str = "lo") -> list[str]:
    """Programs on the ingress of `dev` in the namespace: tcx links ("tcx:ID", Linux
    6.6) and our TC filters ("tc:ID", handle 0x7475)."""
    query = "import socket, sys; from turnserver.io.kernel.program import tcx_program_ids; "
    query += f"print(*tcx_program_ids(socket.if_nametoindex({dev!r})))"
    root = str(Path(__file__).resolve().parents[2])
    tcx = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", query],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout.split()
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "ingress"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tc = [
        line.split(" id ")[1].split()[0]
        for line in out.splitlines()
        if "handle 0x7475" in line and " id " in line
    ]
    return [f"tcx:{i}" for i in tcx] + [f"tc:{i}" for i in tc]
