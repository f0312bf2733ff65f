"""Starting our server and coturn's tools as subprocesses for interop tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from turnserver.testing import (  # noqa: F401 - the tests' names for them
    ServerProcess,
    free_port,
    loopback_args,
    serve_command,
    server_process,
    stun_ping,
    wait_for_stun,
)


@contextmanager
def turnserver_process(
    tmp: Path,
    *args: str,
    port: int | None = None,
    streams: bool = False,
    tls_port: int | None = None,
    workers: int | None = 1,
    metrics: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """`python -m turnserver serve` on 127.0.0.1, waited for until it answers STUN.

    With streams, also tcp:// on the same port number and tls:// on tls_port (the
    caller passes --cert/--key); `workers` None: the default count."""
    with server_process(
        tmp,
        *args,
        port=port,
        streams=streams,
        tls_port=tls_port,
        workers=workers,
        metrics=metrics,
        env=env,
    ) as server:
        yield server


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
