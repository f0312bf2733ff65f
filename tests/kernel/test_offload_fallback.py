"""The kernel fast path on by default (relay.offload: auto) can only ever fall back to
user space: a failure at each step — loading the program, its self-test, attaching it,
installing a flow in its maps — leaves a server that relays every packet user space
would have, and says why. Needs root (the working steps load the real program)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.kernel import unavailable
from tests.support.server import SECRET, EchoProtocol, settings_for_tests
from turnserver.client.turnclient import TurnClient
from turnserver.io.kernel import flows as flows_module
from turnserver.io.kernel.program import ChannelRelayProgram, FlowMaps, OffloadError
from turnserver.ops.http.credentials import mint
from turnserver.ops.process.app import Server

PACKETS = 50


def _fail(step: str) -> Callable[..., Any]:
    def injected(*args: Any, **kwargs: Any) -> Any:
        raise OffloadError(f"injected failure: {step}")

    return injected


# step -> (what to break, whether it breaks once the server runs: the program is on)
STEPS: dict[str, tuple[tuple[Any, str], bool]] = {
    "load": ((ChannelRelayProgram, "__init__"), False),
    "self-test": ((flows_module, "self_test"), False),
    "attach": ((ChannelRelayProgram, "attach"), False),
    "map update": ((FlowMaps, "add"), True),  # the self-test adds flows too: after it
}


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("the kernel fast path needs root (CAP_BPF, CAP_NET_ADMIN)")


async def _relay_round_trips(server: Server, peer: tuple[str, int]) -> int:
    """A client binds a channel to the echo peer and sends PACKETS datagrams; how many
    come back."""
    address = next(s for s in server.runtime.bound_addresses() if s.scheme == "udp")
    cred = mint(SECRET, "fallback", 600, time.time())
    c = await TurnClient.connect("udp", (address.host, address.port), cred.username, cred.password)
    try:
        await c.allocate()
        await c.channel_bind(0x4001, peer)
        back = 0
        for i in range(PACKETS):
            c.send_channel(0x4001, b"packet %d" % i)
            _, data = await c.receive(2)
            back += data == b"packet %d" % i
        return back
    finally:
        c.close()


@pytest.mark.parametrize("step", list(STEPS))
async def test_a_failing_step_falls_back_and_loses_nothing(
    step: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (target, name), on_after = STEPS[step]
    caplog.set_level(logging.INFO, logger="turnserver")
    if not on_after:
        monkeypatch.setattr(target, name, _fail(step))
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(EchoProtocol, local_addr=("127.0.0.1", 0))
    server = Server(settings_for_tests(offload="auto", workers=1), loop)
    await server.start()
    if on_after:
        monkeypatch.setattr(target, name, _fail(step))
    try:
        offload = server.runtime.offload
        assert (offload is not None) is on_after, step
        if not on_after:
            assert f"kernel fast path off (auto): injected failure: {step}" in caplog.text
        assert await _relay_round_trips(server, echo.get_extra_info("sockname")[:2]) == PACKETS
        if offload is not None:  # the flow stayed in user space, and it was counted
            assert offload.add_failures >= 1 and not offload.installed
            assert "kernel fast path: flow kept in user space: injected failure" in caplog.text
    finally:
        await server.stop()
        echo.close()


async def test_with_nothing_broken_the_kernel_relays(caplog: pytest.LogCaptureFixture) -> None:
    """The control: the same server and client with no failure injected relay the
    channel in the kernel (so the cases above did exercise a fallback)."""
    caplog.set_level(logging.INFO, logger="turnserver")
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(EchoProtocol, local_addr=("127.0.0.1", 0))
    server = Server(settings_for_tests(offload="auto", workers=1), loop)
    await server.start()
    try:
        offload = server.runtime.offload
        assert offload is not None, caplog.text
        assert await _relay_round_trips(server, echo.get_extra_info("sockname")[:2]) == PACKETS
        offload.fold(server.runtime.core.allocations)
        assert sum(offload.relayed) >= PACKETS  # most of them went through the kernel
    finally:
        await server.stop()
        echo.close()
