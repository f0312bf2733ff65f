"""pytest plugin (registered as `turnserver` under pytest11): a `turn_server` fixture.

    def test_call_relays(turn_server):
        config = {"iceServers": turn_server.ice_servers(), "iceTransportPolicy": "relay"}
        ...
        turn_server.impair(udp="block")

Each test gets its own `turnserver dev` subprocess on ephemeral loopback ports (stopped
with everything it started); `@pytest.mark.turn_impair(udp="loss:20")` starts it
impaired.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from turnserver.testing import TurnServerFixture


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "turn_impair(**specs): start the turn_server fixture with impairments"
    )


@pytest.fixture
def turn_server(request: pytest.FixtureRequest) -> Iterator[TurnServerFixture]:
    """A local TURN server (UDP, TCP, TLS) in developer mode for this test."""
    marker = request.node.get_closest_marker("turn_impair")
    impair = dict(marker.kwargs) if marker is not None else None
    with TurnServerFixture(impair=impair) as server:
        yield server
