"""The authorization hook against an HTTP endpoint the test starts, with aioice and raw
STUN clients, the default worker count and one worker: users only the hook knows
allocate (and its tenant applies); a slow hook holds only its own users; a failing
hook opens the circuit, which closes once it answers again; a flapping one never
holds other users; a flood of unknown usernames from many addresses reaches the hook
at no more than the configured rate. Passwords from the hook never reach the log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioice import turn

from tests.support import WORKER_COUNTS, Collector, eventually
from tests.support.endpoints import HookServer
from tests.support.procs import ServerProcess, free_port, turnserver_process
from tests.support.server import free_port_range
from turnserver.ops.http.credentials import mint
from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_message
from turnserver.stun.message import long_term_key

pytestmark = pytest.mark.one_loop  # the server is a subprocess

TOP = "top-secret-hook"
RATE, BURST = 20, 20
HOOK_TOKEN = "hook-token-0123456789"
USERS = {
    "hookuser": ("hook-pw-7c1e", "hooked"),
    "slowuser": ("slow-pw-2b9d", "default"),
    **{f"back{i}": (f"back-pw-{i}", "default") for i in range(40)},
}


@contextmanager
def _server(
    tmp: Path, hook: HookServer, workers: int | None, extra: str = ""
) -> Iterator[tuple[ServerProcess, int]]:
    lo, hi = free_port_range(200)
    (tmp / "hook-token").write_text(HOOK_TOKEN + "\n")
    config = tmp / "turnserver.yaml"
    config.write_text(
        f"""
realm: example.org
auth: {{secrets: [{TOP}]}}
peers: {{allow_loopback: true}}
relay: {{min_port: {lo}, max_port: {hi}}}
tenants:
  hooked:
    realm: hooked.example
    quotas: {{max_allocations: 5}}
auth_hook:
  url: {hook.url}
  token_file: {tmp / "hook-token"}
  timeout: 3
  concurrency: 8
  rate_per_second: {RATE}
  rate_burst: {BURST}
  failures_to_open: 3
  open_seconds: 2
  negative_ttl: 30
{extra}"""
    )
    metrics = free_port()
    with turnserver_process(
        tmp, "--config", str(config), workers=workers, metrics=f"127.0.0.1:{metrics}"
    ) as server:
        yield server, metrics


async def _metric(port: int, series: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        for line in (await resp.text()).splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return 0.0


async def _allocate(port: int, username: str, password: str) -> Any:
    transport, _ = await turn.create_turn_endpoint(
        Collector, server_addr=("127.0.0.1", port), username=username, password=password
    )
    return transport


async def _rest_allocation_time(port: int) -> float:
    """How long a REST user (not the hook's) takes to allocate."""
    cred = mint(TOP, "bystander", 600, time.time())
    start = time.monotonic()
    transport = await _allocate(port, cred.username, cred.password)
    took = time.monotonic() - start
    transport.close()
    return took


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_hook_users_allocate_and_a_slow_hook_holds_only_them(
    tmp_path: Path, workers: int | None
) -> None:
    hook = HookServer(USERS, token=HOOK_TOKEN)
    await hook.up()
    try:
        with _server(tmp_path, hook, workers) as (server, metrics):
            transport = await _allocate(server.port, "hookuser", "hook-pw-7c1e")
            transport.close()
            assert hook.bodies[0]["username"] == "hookuser"
            assert hook.bodies[0]["realm"] == "example.org"
            assert hook.bodies[0]["transport"] == "udp"
            assert hook.bodies[0]["client_ip"] == "127.0.0.1"
            series = 'turn_tenant_allocations_total{tenant="hooked"}'
            assert await _metric(metrics, series) == 1  # the hook's tenant applies
            with pytest.raises(Exception, match="401"):
                await _allocate(server.port, "nobody", "guess")
            with pytest.raises(Exception, match="401"):
                await _allocate(server.port, "hookuser", "wrong-password")
            # a slow hook (2 s): its user waits, a REST user does not
            hook.mode = "slow"
            asked = len(hook.asked)
            slow = asyncio.create_task(_allocate(server.port, "slowuser", "slow-pw-2b9d"))
            await asyncio.sleep(0.3)
            assert not slow.done()
            assert await _rest_allocation_time(server.port) < 1.0
            (await asyncio.wait_for(slow, 10)).close()
            assert [u for _, u in hook.asked[asked:]] == ["slowuser"]  # retransmits: one ask
            allowed = 'turn_auth_hook_requests_total{outcome="allowed"}'
            # (each worker asks once and caches: the wrong password may be another's)
            assert await _metric(metrics, allowed) in (2, 3)
    finally:
        await hook.down()
    log = server.log()
    assert "hook-pw-7c1e" not in log and "slow-pw-2b9d" not in log and HOOK_TOKEN not in log


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_failing_hook_opens_the_circuit_which_closes_when_it_answers(
    tmp_path: Path, workers: int | None
) -> None:
    hook = HookServer(USERS)
    await hook.up()
    try:
        with _server(tmp_path, hook, workers) as (server, metrics):
            hook.mode = "fail"
            quiet = 0
            for attempt in range(40):  # until no worker asks any more: every circuit open
                before = len(hook.asked)
                with pytest.raises(Exception, match="401"):
                    await _allocate(server.port, f"fail{attempt}", "x")
                quiet = quiet + 1 if len(hook.asked) == before else 0
                if quiet >= 6:
                    break
            assert quiet >= 6, "the hook kept being asked"
            assert await _metric(metrics, "turn_auth_hook_circuit_open") == 1
            assert (
                await _metric(metrics, 'turn_auth_hook_requests_total{outcome="circuit_open"}') >= 6
            )
            assert await _rest_allocation_time(server.port) < 1.0  # others unaffected
            hook.mode = "ok"

            async def back() -> bool:
                for i in range(40):
                    with contextlib.suppress(Exception):
                        (await _allocate(server.port, f"back{i}", f"back-pw-{i}")).close()
                return await _metric(metrics, "turn_auth_hook_circuit_open") == 0

            await eventually(back, timeout=20, interval=0.5, what="the circuit closed")
            await _flap(server, hook)
    finally:
        await hook.down()
    log = server.log()
    assert "circuit open" in log and "circuit closed" in log


async def _flap(server: ServerProcess, hook: HookServer) -> None:
    """The hook fails and answers by turns for 5 s: REST users always allocate, promptly;
    the hook's users get an answer every time (an allocation or 401), never a hang."""
    stop = time.monotonic() + 5

    async def flapping() -> None:
        while time.monotonic() < stop:
            hook.mode = "fail" if hook.mode == "ok" else "ok"
            await asyncio.sleep(0.3)
        hook.mode = "ok"

    async def hook_users() -> list[str]:
        outcomes = []
        n = 0
        while time.monotonic() < stop:
            n += 1
            try:
                (
                    await asyncio.wait_for(
                        _allocate(server.port, f"back{n % 40}", f"back-pw-{n % 40}"), 8
                    )
                ).close()
                outcomes.append("ok")
            except TimeoutError:
                outcomes.append("hang")
            except Exception as exc:
                outcomes.append("401" if "401" in str(exc) else str(exc))
        return outcomes

    async def bystanders() -> list[float]:
        took = []
        while time.monotonic() < stop:
            took.append(await _rest_allocation_time(server.port))
            await asyncio.sleep(0.1)
        return took

    _, outcomes, took = await asyncio.gather(flapping(), hook_users(), bystanders())
    assert set(outcomes) <= {"ok", "401"}, outcomes
    assert "ok" in outcomes
    assert len(took) >= 10 and max(took) < 1.0, took


async def _flood(server_port: int, seconds: float, per_second: int) -> int:
    """Allocates from 50 loopback addresses, each with a new unknown username, at
    `per_second` in all; returns how many were sent."""
    loop = asyncio.get_running_loop()
    sockets = []
    for i in range(50):
        transport, proto = await loop.create_datagram_endpoint(
            Collector, local_addr=(f"127.0.0.{10 + i}", 0)
        )
        sockets.append((transport, proto))
    server = ("127.0.0.1", server_port)
    nonces = []
    for transport, proto in sockets:  # each address's nonce (RFC 8489 §9.2: bound to it)
        transport.sendto(
            encode_message(
                Method.ALLOCATE,
                MessageClass.REQUEST,
                os.urandom(12),
                [(Attr.REQUESTED_TRANSPORT, 17)],
            ),
            server,
        )
        challenge = decode_message(await asyncio.wait_for(proto.queue.get(), 3))
        nonces.append((challenge.get(Attr.NONCE), challenge.get(Attr.REALM)))
    sent = 0
    tick = 50 / per_second
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for (transport, _), (nonce, realm) in zip(sockets, nonces, strict=True):
            user = f"flood-{sent}"
            attrs = [
                (Attr.REQUESTED_TRANSPORT, 17),
                (Attr.USERNAME, user),
                (Attr.REALM, realm),
                (Attr.NONCE, nonce),
            ]
            key = long_term_key(user, realm, "guess")
            transport.sendto(
                encode_message(
                    Method.ALLOCATE, MessageClass.REQUEST, os.urandom(12), attrs, integrity_key=key
                ),
                server,
            )
            sent += 1
        await asyncio.sleep(tick)
    for transport, _ in sockets:
        transport.close()
    return sent


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_a_flood_of_unknown_users_reaches_the_hook_at_the_configured_rate(
    tmp_path: Path, workers: int | None
) -> None:
    hook = HookServer(USERS)
    await hook.up()
    try:
        with _server(tmp_path, hook, workers) as (server, metrics):
            loop = asyncio.get_running_loop()
            start = loop.time()
            flood = asyncio.create_task(_flood(server.port, 2.0, 1000))
            await asyncio.sleep(0.5)
            assert await _rest_allocation_time(server.port) < 1.0  # others unaffected
            sent = await flood
            end = loop.time()
            await asyncio.sleep(0.5)  # questions in flight arrive
            asked = [t for t, user in hook.asked if user.startswith("flood-")]
            allowed = RATE * (end - start) + BURST
            assert sent >= 1500
            assert 10 <= len(asked) <= allowed + 2, (len(asked), allowed)
            limited = 'turn_auth_hook_requests_total{outcome="rate_limited"}'
            assert await _metric(metrics, limited) >= sent - allowed - 50
    finally:
        await hook.down()


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_fail_open_keeps_last_good_answers(tmp_path: Path, workers: int | None) -> None:
    """auth_hook.fail_open: while the hook fails, a user it allowed before allocates on
    its last good answer (from one client port: the same worker each time); a user it
    never allowed still gets 401."""
    from turnserver.client.turnclient import TurnClient, TurnClientError

    hook = HookServer(USERS)
    await hook.up()
    extra = "  fail_open: true\n  cache_ttl: 1\n"
    try:
        with _server(tmp_path, hook, workers, extra) as (server, metrics):
            local = ("127.0.0.1", free_port())

            async def allocate(user: str, password: str) -> None:
                client = await TurnClient.connect(
                    "udp", ("127.0.0.1", server.port), user, password, local=local
                )
                try:
                    await client.allocate()
                    await client.refresh(0)
                finally:
                    client.close()

            await allocate("hookuser", "hook-pw-7c1e")
            await asyncio.sleep(1.5)  # the cached answer is gone; the last good one stays
            hook.mode = "fail"
            asked = len(hook.asked)
            await allocate("hookuser", "hook-pw-7c1e")
            assert len(hook.asked) == asked + 1  # it was asked, failed, and the user got in
            assert await _metric(metrics, 'turn_auth_hook_requests_total{outcome="stale"}') == 1
            with pytest.raises(TurnClientError) as refused:
                await allocate("back1", "back-pw-1")
            assert refused.value.code == 401
            assert "authorization hook unavailable" in refused.value.reason
    finally:
        await hook.down()
