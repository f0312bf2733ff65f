"""Starting our server and coturn's tools as subprocesses for interop tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from turnserver.testing import (  # noqa: F401 - the tests' names for them
    ServerProcess,
    free_port,
    loopback_args,
    serve_command,
    server_process,
    stun_ping,
    wait_for_stun,
)

turnserver_process = server_process  # the tests' name for it


@contextmanager
def background(cmd: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m turnserver ARGS`, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "turnserver", *args], capture_output=True, text=True, timeout=timeout
    )
