"""Starting our server and coturn's tools as subprocesses for interop tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from turnserver.stun import MessageClass, Method, decode_message, encode_message


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free for UDP and for TCP on 127.0.0.1 (so one number serves both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def stun_ping(addr: tuple[str, int], timeout: float = 0.2) -> bool:
    """True when a STUN Binding request to addr is answered."""
    req = encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(req, addr)
            data, _ = s.recvfrom(2048)
        except OSError:
            return False
    return decode_message(data).message_class == MessageClass.SUCCESS


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def turnserver_process(
    tmp: Path,
    *args: str,
    port: int | None = None,
    streams: bool = False,
    tls_port: int | None = None,
) -> Iterator[ServerProcess]:
    """`python -m turnserver serve` on 127.0.0.1, waited for until it answers STUN.

    With streams, also tcp:// on the same port number and tls:// on tls_port (the
    caller passes --cert/--key)."""
    port = port or free_port()
    log_path = tmp / f"turnserver-{port}.log"
    listen = ["--listen", f"udp://127.0.0.1:{port}"]
    if streams:
        listen += ["--listen", f"tcp://127.0.0.1:{port}"]
        if tls_port:
            listen += ["--listen", f"tls://127.0.0.1:{tls_port}"]
    cmd = [
        sys.executable,
        "-m",
        "turnserver",
        "serve",
        *listen,
        "--metrics-listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        *args,
    ]

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not stun_ping(("127.0.0.1", port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log_path.read_text()}")
        yield ServerProcess(proc, port, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
