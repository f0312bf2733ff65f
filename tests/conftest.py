"""Shared fixtures: an in-process server on loopback and a UDP echo peer."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from turnserver.io.loop import uvloop_available
from turnserver.io.runtime import ListenAddress, ServerRuntime
from turnserver.ops.app import Server
from turnserver.ops.config import Settings, StaticUser
from turnserver.ops.selfsigned import ensure_self_signed

SECRET = "test-shared-secret"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token"
API_KEY = "test-api-key"

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

LOOPS = ["asyncio", "uvloop"] if uvloop_available() or IN_CI else ["asyncio"]


def require_tool(name: str, package: str = "coturn") -> str:
    """Path of an interop client; fail in CI, skip with a reason on a laptop."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (apt-get install {package}); .ci/run installs it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the stdlib loop and on uvloop (the default in production),
    but for `one_loop` tests: the server is a subprocess, the loop only the client's."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if "uvloop" in LOOPS and item.get_closest_marker("one_loop") is None:
        import uvloop

        factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "one_loop: run an async test on the stdlib loop only")
    config.addinivalue_line("markers", "unit: no sockets, no processes; `make unit` runs these")


# Modules whose tests touch no socket and start no process: the codec, the sans-IO core
# and pure helpers. `make unit` runs them in seconds; `make test` runs everything.
UNIT_MODULES = frozenset(
    {
        "test_advisories",
        "test_core",
        "test_core_adversarial",
        "test_core_boundary",
        "test_core_limits",
        "test_core_sequences",
        "test_core_tcp_relay",
        "test_eventlog",
        "test_fleet_rules",
        "test_framing",
        "test_layers",
        "test_peer_policy",
        "test_proxy_protocol",
        "test_rest_usernames",
        "test_scrape_throttle",
        "test_shared_quota",
        "test_stun_codec",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)


# The ports a server takes by default (TURN, TLS, metrics, API, admin): the suite holds
# whichever are free for its whole run, so that no test can depend on them being free
# (an operator's coturn or Prometheus may be there; CI must not care).
DEFAULT_PORTS = (
    (3478, socket.SOCK_DGRAM),
    (3478, socket.SOCK_STREAM),
    (5349, socket.SOCK_STREAM),
    (9641, socket.SOCK_STREAM),
    (8080, socket.SOCK_STREAM),
    (8443, socket.SOCK_STREAM),
)


@pytest.fixture(scope="session", autouse=True)
def default_ports_are_taken() -> Iterator[None]:
    held = []
    for port, kind in DEFAULT_PORTS:
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.bind(("0.0.0.0", port))
            if kind == socket.SOCK_STREAM:
                sock.listen(1)
        except OSError:
            sock.close()  # taken already, which is as good
            continue
        held.append(sock)
    yield
    for sock in held:
        sock.close()


def free_port_range(count: int = 200) -> tuple[int, int]:
    """A port range unlikely to collide between parallel runs."""
    base = 40000 + (os.getpid() * 7) % 15000
    return base, base + count - 1


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


def test_settings(**overrides: object) -> Settings:
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


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    marker = request.node.get_closest_marker("server_settings")
    settings = test_settings(**(marker.kwargs if marker else {}))

    server = Server(settings, asyncio.get_running_loop())
    await server.start()
    try:
        yield RunningServer(server.runtime, settings, server)
    finally:
        await server.stop()


class EchoProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.received = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


@pytest.fixture
async def echo_peer() -> AsyncIterator[tuple[tuple[str, int], EchoProtocol]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        EchoProtocol, local_addr=("127.0.0.1", 0)
    )
    try:
        yield transport.get_extra_info("sockname")[:2], proto
    finally:
        transport.close()


@pytest.fixture
def udp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    try:
        yield sock
    finally:
        sock.close()
