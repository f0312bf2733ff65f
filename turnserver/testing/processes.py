"""Server processes on loopback for tests and benchmarks: ephemeral ports, started,
waited for until they answer STUN, stopped with everything they started, and measured
(their process tree and resident memory).

    with server_process(tmp_path, "--secret", "s") as server:
        ...  # server.port answers STUN and TURN over UDP (and TCP with streams=True)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


def free_ports(count: int) -> list[int]:
    """`count` different ports, each free for UDP and for TCP on 127.0.0.1: each is held
    while the next is picked (one at a time, the kernel may hand out the same number
    twice in a row)."""
    held: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            port = free_port()
            if port in ports:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", port))
            held.append(s)
            ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


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


def wait_for(
    proc: subprocess.Popen[bytes], done: Callable[[], bool], timeout: float, what: str
) -> None:
    """Wait until `done()` while `proc` runs; RuntimeError if it exits first or the time
    runs out (saying `what` did not happen)."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:g} s")
        time.sleep(0.02)


def wait_for_stun(proc: subprocess.Popen[bytes], port: int, timeout: float = 15.0) -> None:
    """Wait until 127.0.0.1:port answers STUN; RuntimeError if the process exits first
    or the time runs out."""
    wait_for(
        proc,
        lambda: stun_ping(("127.0.0.1", port)),
        timeout,
        f"nothing answered STUN on port {port}",
    )


def loopback_args(secret: str, lo: int, hi: int) -> list[str]:
    """A shared secret, loopback peers allowed and a relay port range: the flags a test
    server on 127.0.0.1 usually needs."""
    return [
        "--secret",
        secret,
        "--allow-loopback-peers",
        "--min-port",
        str(lo),
        "--max-port",
        str(hi),
    ]


def serve_command(
    port: int,
    *args: str,
    streams: bool = False,
    tls_port: int | None = None,
    workers: int | None = 1,
    metrics: str = "off",
) -> list[str]:
    """`python -m turnserver serve` on 127.0.0.1:port (udp; tcp too with streams, and
    tls on tls_port), one worker (None: the default count, one per CPU) and no metrics
    listener unless asked, plus `args`."""
    listen = ["--listen", f"udp://127.0.0.1:{port}"]
    if streams:
        listen += ["--listen", f"tcp://127.0.0.1:{port}"]
    if tls_port:
        listen += ["--listen", f"tls://127.0.0.1:{tls_port}"]
    return [
        sys.executable,
        "-m",
        "turnserver",
        "serve",
        *listen,
        "--metrics-listen",
        metrics,
        *(["--workers", str(workers)] if workers is not None else []),
        *args,
    ]


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    """Signal a process and wait for it (a supervisor forwards the signal to its
    workers); after 15 s, or once it is gone, SIGKILL to whatever is left of the process
    group it leads. SIGINT stops a server at once; SIGTERM would drain it first, waiting
    up to drain.timeout for live allocations."""
    try:
        leads_group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        leads_group = False
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if leads_group:  # stragglers: workers of a supervisor that did not stop them
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def process_tree(pid: int) -> list[int]:
    """pid and every descendant (worker processes), from /proc."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            for child in children:
                pids += process_tree(int(child))
    except OSError:
        pass
    return pids


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += (
                int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) * 1024
            )
        except (OSError, StopIteration):
            pass
    return total


@dataclass
class ServerProcess:
    """A running server: its process, UDP (and TCP) port and log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def server_process(
    tmp: Path,
    *args: str,
    port: int | None = None,
    streams: bool = False,
    tls_port: int | None = None,
    workers: int | None = 1,
    metrics: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
    start_timeout: float = 15.0,
) -> Iterator[ServerProcess]:
    """Start a server, wait until it serves (it answers STUN on its UDP port and has
    written its state file, which it does once every listener and API is up), stop it at
    the end."""
    port = port or free_port()
    log_path = tmp / f"turnserver-{port}.log"
    cmd = serve_command(
        port, *args, streams=streams, tls_port=tls_port, workers=workers, metrics=metrics
    )
    env = dict(os.environ if env is None else env)
    state = Path(env.setdefault("TURNSERVER_STATE_FILE", str(tmp / f"turnserver-{port}.json")))
    state.unlink(missing_ok=True)  # an earlier server's (killed) is not this one's
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )  # its own process group: stopped with its workers
    try:
        try:
            wait_for_stun(proc, port, start_timeout)
            # the APIs bind after the listeners answer; the state file comes last
            wait_for(proc, state.exists, start_timeout, f"no state file {state}")
        except RuntimeError as exc:
            raise RuntimeError(f"server did not start ({exc}): {log_path.read_text()}") from None
        yield ServerProcess(proc, port, log_path)
    finally:
        stop_process(proc)
