"""Shared fixtures (an in-process server on loopback, a UDP echo peer), the loops every
async test runs on, and the markers each test directory carries: unit/ (`make unit`),
integration/, interop/ and kernel/ (privileged)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.support.server import LOOPS, EchoProtocol, RunningServer, settings_for_tests
from turnserver.ops.process.app import Server


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
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


# Each test directory is a kind of test, and its marker: `make unit` runs tests/unit
# (`pytest -m unit` selects the same), `-m "not kernel"` leaves out the privileged ones.
MARKERS = {
    "unit": "no sockets, no processes; `make unit` runs these (tests/unit)",
    "integration": "a real server in-process or as a subprocess (tests/integration)",
    "interop": "clients and proxies we did not write (tests/interop)",
    "kernel": "privileged: BPF and network namespaces (tests/kernel)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        kind = item.path.relative_to(root).parts[0]
        if kind in MARKERS:
            item.add_marker(getattr(pytest.mark, kind))


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


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    marker = request.node.get_closest_marker("server_settings")
    settings = settings_for_tests(**(marker.kwargs if marker else {}))

    server = Server(settings, asyncio.get_running_loop())
    await server.start()
    try:
        yield RunningServer(server.runtime, settings, server)
    finally:
        await server.stop()


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
