"""Running turnserver from tests (ours, and an application's) and from benchmarks.

`TurnServerFixture` (and the pytest plugin's `turn_server` fixture built on it) is what an
application's relay-only tests use; `server_process` and the helpers around it start,
wait for, stop and measure server processes on loopback with ephemeral ports.
"""

from turnserver.testing.fixture import TurnServerFixture
from turnserver.testing.processes import (
    ServerProcess,
    free_port,
    free_ports,
    loopback_args,
    process_tree,
    rss_bytes,
    serve_command,
    server_process,
    stop_process,
    stun_ping,
    wait_for_stun,
)

__all__ = [
    "ServerProcess",
    "TurnServerFixture",
    "free_port",
    "free_ports",
    "loopback_args",
    "process_tree",
    "rss_bytes",
    "serve_command",
    "server_process",
    "stop_process",
    "stun_ping",
    "wait_for_stun",
]
