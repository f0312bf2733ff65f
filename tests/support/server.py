"""What the tests share about a server: the test secrets and certificate, the settings of
the in-process server fixture, the interop tools' lookup (fail in CI, skip on a laptop)
and a UDP echo peer."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from turnserver.io.loop import uvloop_available
from turnserver.io.runtime import ListenAddress, ServerRuntime
from turnserver.ops.config.settings import Settings, StaticUser
from turnserver.ops.dev.selfsigned import ensure_self_signed
from turnserver.ops.process.app import Server

SECRET = "test-shared-secret"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token"
API_KEY = "test-api-key"

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

LOOPS = ["asyncio", "uvloop"] if uvloop_available() or IN_CI else ["asyncio"]


def missing(why: str, in_ci: str = "") -> NoReturn:
    """Something a test needs is not here: a failure in CI (.ci/run provides everything;
    `in_ci` says what instead of `why`), a skip with the reason on a laptop."""
    if IN_CI:
        pytest.fail(in_ci or why)
    pytest.skip(why)


def require_tool(name: str, package: str = "coturn") -> str:
    """Path of an interop client; fail in CI, skip with a reason on a laptop."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not found (apt-get install {package}); .ci/run installs it")
    return path


def _ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            lo, hi = map(int, fh.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port_range(count: int = 200) -> tuple[int, int]:
    """A relay port range no ephemeral bind of this host can take (outside
    ip_local_port_range: a client socket of the test landing on a relay port made a
    3-port test range run out), and unlikely to collide between parallel runs."""
    lo, hi = _ephemeral_ports()
    above, below = 65535 - hi, lo - 1024
    room, start = (above, hi + 1) if above >= count else (below, 1024)
    slots = max(1, room // count)
    base = start + (os.getpid() % slots) * count
    return base, min(base + count - 1, 65535)


CERT_DIR = Path(tempfile.mkdtemp(prefix="turnserver-test-certs-"))
atexit.register(shutil.rmtree, CERT_DIR, True)  # the run leaves no key behind
CERT_FILE = str(CERT_DIR / "cert.pem")
KEY_FILE = str(CERT_DIR / "key.pem")
ensure_self_signed(CERT_FILE, KEY_FILE, ["localhost", "127.0.0.1"])


def client_ssl_context() -> ssl.SSLContext:
    """A client context that trusts the test certificate."""
    ctx = ssl.create_default_context(cafile=CERT_FILE)
    ctx.check_hostname = False
    return ctx


def settings_for_tests(**overrides: object) -> Settings:
    lo, hi = free_port_range()
    values: dict[str, object] = {
        "realm": "test.example",
        "secrets": (SECRET,),
        "users": (StaticUser("alice", password="alice-pw"),),
        "listen": (
            ListenAddress("udp", "127.0.0.1", 0),
            ListenAddress("tcp", "127.0.0.1", 0),
            ListenAddress("tls", "127.0.0.1", 0),
        ),
        "cert_file": CERT_FILE,
        "key_file": KEY_FILE,
        "relay_ips": ("127.0.0.1",),
        "min_port": lo,
        "max_port": hi,
        "allow_loopback_peers": True,
        "log_level": "warning",
        "api_listen": ("127.0.0.1", 0),
        "metrics_listen": ("127.0.0.1", 0),
        "probe_interval": 0,
        "accounts": ((ACCOUNT_SID, AUTH_TOKEN), (ACCOUNT_SID, "rotated-token")),
        "api_keys": (API_KEY,),
        "api_max_ttl": 86400,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class RunningServer:
    runtime: ServerRuntime
    settings: Settings
    server: Server

    @property
    def api_base(self) -> str:
        return self.server.api_base

    @property
    def address(self) -> tuple[str, int]:
        return self.address_of("udp")

    def address_of(self, scheme: str) -> tuple[str, int]:
        spec = next(s for s in self.runtime.bound_addresses() if s.scheme == scheme)
        return spec.host, spec.port


class EchoProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.received = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]
