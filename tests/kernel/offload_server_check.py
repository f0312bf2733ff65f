"""Run inside a network namespace the test made (ip netns exec NS python THIS): our
server with `relay.offload: ebpf`, aioice (a TURN client we did not write) relaying to a
UDP echo peer through a channel; prints one JSON object with what the kernel did."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aioice import turn

from turnserver.core.policy import DefaultPeerPolicy
from turnserver.io.kernel.program import tcx_program_ids
from turnserver.io.runtime import ListenAddress
from turnserver.ops.config.settings import Settings
from turnserver.ops.http.credentials import mint
from turnserver.ops.process.app import Server


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


class Queue(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


async def delivered(
    relay_t: Any, proto: Queue, payload: bytes, peer: tuple[str, int], wait: float = 0.5
) -> bool:
    """Send through the allocation; True when the echo comes back within `wait`."""
    relay_t.sendto(payload, peer)
    try:
        return await asyncio.wait_for(proto.queue.get(), wait) == payload
    except TimeoutError:
        return False


async def main() -> None:
    settings = Settings(
        secrets=("s",),
        listen=(ListenAddress("udp", "127.0.0.1", 3478),),
        allow_loopback_peers=True,
        min_port=50000,
        max_port=50999,
        metrics_listen=None,
        probe_interval=0,
        workers=1,
        offload="ebpf",
    )
    loop = asyncio.get_running_loop()
    server = Server(settings, loop)
    await server.start()
    runtime = server.runtime
    offload = runtime.offload
    assert offload is not None
    out: dict[str, Any] = {}
    echo_t, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.3", 0))
    peer = echo_t.get_extra_info("sockname")
    cred = mint("s", "kernel", 600, time.time())
    relay_t, proto = await turn.create_turn_endpoint(
        Queue, server_addr=("127.0.0.1", 3478), username=cred.username, password=cred.password
    )
    ok = 0
    for i in range(200):
        payload = b"%d " % i * 20
        relay_t.sendto(payload, peer)
        ok += await asyncio.wait_for(proto.queue.get(), 2) == payload
        if i == 4:  # aioice binds its channel after the first sends: wait for the flow
            for _ in range(100):
                if offload.active():
                    break
                await asyncio.sleep(0.05)
    out["echoed"] = ok
    out["flows"] = offload.active()
    (ft,) = runtime.core.allocations
    counts = offload.prog.counters(*next(iter(offload.installed[ft].values())))
    out["kernel_counts"] = list(counts)
    text = server.metrics.registry  # fold through the metrics collector, as a scrape does
    from prometheus_client import generate_latest

    metrics = generate_latest(text).decode()
    out["metrics"] = [ln for ln in metrics.splitlines() if ln.startswith("turn_offload_")]
    alloc = runtime.core.allocations[ft]
    out["alloc_counts"] = [alloc.packets_to_peer, alloc.packets_to_client]
    # The permission expires (RFC 8656 §9.2: the clock passes its 300 s): the core's
    # timer removes the kernel's flow at once and the next packet is not relayed
    runtime.core.handle_timer(runtime.now() + 301)
    runtime.after_core_call()
    out["flows_after_expiry"] = offload.active()
    out["expired_delivered"] = await delivered(relay_t, proto, b"expired", peer)
    # aioice refreshes its channel when its refresh time has come (ChannelBind installs
    # the permission again, §12.2): the kernel takes the flow back
    inner = relay_t._TurnTransport__inner_protocol  # type: ignore[attr-defined]
    for number in inner.channel_refresh_at:
        inner.channel_refresh_at[number] = 0
    out["refreshed_delivered"] = await delivered(relay_t, proto, b"refreshed", peer, 2)
    for _ in range(100):
        if offload.active():
            break
        await asyncio.sleep(0.05)
    out["flows_after_refresh"] = offload.active()
    # SIGHUP that denies loopback peers: the kernel path stops at once
    runtime.core.peer_policy = DefaultPeerPolicy(allow_loopback=False)
    runtime.core.revoke_denied_peers()
    runtime.after_core_call()
    out["flows_after_deny"] = offload.active()
    out["denied_delivered"] = await delivered(relay_t, proto, b"denied", peer)
    ended: list[Any] = []
    runtime.event_sinks.append(
        lambda e: ended.append(e) if type(e).__name__ == "AllocationEnded" else None
    )
    relay_t.close()  # aioice: Refresh with LIFETIME 0
    for _ in range(50):
        if not runtime.core.allocations:
            break
        await asyncio.sleep(0.05)
    out["ended_counts"] = [ended[0].packets_to_peer, ended[0].packets_to_client] if ended else None
    out["flows_at_end"] = offload.active()
    echo_t.close()
    await server.stop()
    tc = subprocess.run(
        ["tc", "filter", "show", "dev", "lo", "ingress"], capture_output=True, text=True
    )
    # nothing left on lo: no TC filter, no tcx program
    out["tc_after_stop"] = tc.stdout.strip() + " ".join(
        map(str, tcx_program_ids(socket.if_nametoindex("lo")))
    )
    print(json.dumps(out))


if __name__ == "__main__":
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    asyncio.run(main())
