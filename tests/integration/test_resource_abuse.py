"""Resource abuse, item by item: EVEN-PORT reservations under quotas, the core on the
monotonic clock, admin paths quoted, developer mode closed without a key, TLS
handshakes rate-limited per source, HTTP listeners capped inside the descriptor
budget."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import WORKER_COUNTS, eventually
from tests.support.core_client import NOW, CoreClient, error_code, make_core
from tests.support.core_client import SECRET as CORE_SECRET
from tests.support.procs import free_port, loopback_args, turnserver_process
from tests.support.server import SECRET, RunningServer, client_ssl_context
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.core.auth import rest_password
from turnserver.ops.http.credentials import mint
from turnserver.stun import Attr, Method

# ---- 8. EVEN-PORT reservations ------------------------------------------------------------


def test_reservations_count_against_quotas_and_end_with_their_allocation() -> None:
    """The attack: with max_per_user 1, 250 cycles of Allocate(EVEN-PORT R=1) + Refresh 0
    held 250 of 500 ports for 30 s. Now a reservation counts as an allocation of its
    owner, ends with the allocation that made it, and all of them hold at most 1/8 of
    the ports."""
    core, _ = make_core(max_allocations_per_user=1)
    c = CoreClient(core)
    assert error_code(c.allocate([(Attr.EVEN_PORT, True)])) == 486  # allocation + port > 1
    core, _ = make_core(max_allocations_per_user=2)
    free_before = core.relay_ports_free()
    for i in range(250):
        c = CoreClient(core, client=("192.0.2.50", 41000 + i))
        resp = c.allocate([(Attr.EVEN_PORT, True)])
        assert error_code(resp) is None and resp.get(Attr.RESERVATION_TOKEN)
        assert error_code(c.request(Method.REFRESH, [(Attr.LIFETIME, 0)])) is None
    assert core.reservations == {} and core.relay_ports_free() == free_before
    # many users at once: reservations stop at 1/8 of the relay ports (100 per family)
    held = 0
    for i in range(40):
        c = CoreClient(core, client=("192.0.2.60", 42000 + i))
        c.username, c.password = f"{int(NOW) + 3600}:user{i}", ""
        c.password = rest_password(CORE_SECRET, c.username)
        code = error_code(c.allocate([(Attr.EVEN_PORT, True)]))
        held += code is None
        assert code in (None, 508)
    assert len(core.reservations) == held == 200 // 8


def test_a_reserved_port_is_used_once_and_counted_once() -> None:
    core, _ = make_core(max_allocations_per_user=2)
    rtp = CoreClient(core, client=("192.0.2.50", 40000))
    token = rtp.allocate([(Attr.EVEN_PORT, True)]).get(Attr.RESERVATION_TOKEN)
    rtcp = CoreClient(core, client=("192.0.2.50", 40001))
    resp = rtcp.allocate([(Attr.RESERVATION_TOKEN, token)])
    assert error_code(resp) is None  # two allocations of the user: within 2
    third = CoreClient(core, client=("192.0.2.50", 40002))
    assert error_code(third.allocate()) == 486
    again = CoreClient(core, client=("192.0.2.50", 40003))
    assert error_code(again.allocate([(Attr.RESERVATION_TOKEN, token)])) in (486, 508)


# ---- 11. the monotonic clock ----------------------------------------------------------------


async def test_a_wall_clock_step_moves_no_lifetime(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An hour's step of the system clock (NTP, a VM resumed): a live allocation keeps
    its lifetime; what is in Unix time (a REST credential's expiry) follows the clock."""
    runtime = server.runtime
    cred = mint(SECRET, "stepped", 1800, time.time())  # expires in 30 minutes
    c = await TurnClient.connect("udp", server.address, cred.username, cred.password)
    await c.allocate(lifetime=600)
    alloc = next(iter(runtime.core.allocations.values()))
    expires = alloc.expires
    monkeypatch.setattr(runtime, "wall", lambda: time.time() + 3600)
    runtime._track_wall_clock()
    assert alloc.expires == expires  # monotonic: untouched
    runtime.core.handle_timer(runtime.now() + 5)
    assert alloc.live
    fresh = await TurnClient.connect("udp", server.address, cred.username, cred.password)
    with pytest.raises(TurnClientError) as info:  # expired an hour early, by the wall clock
        await fresh.allocate()
    assert info.value.code == 401
    fresh.close()
    c.close()


# ---- 12. developer mode needs a key beyond loopback -----------------------------------------


@pytest.mark.server_settings(
    dev=True, api_listen=("0.0.0.0", 0), api_keys=(), api_tls=False, workers=1
)
async def test_impairment_is_refused_without_a_key_beyond_loopback(server: RunningServer) -> None:
    url = f"http://127.0.0.1:{server.server.api_port}/dev/v1/impairment"
    async with aiohttp.ClientSession() as session, session.put(url, json={"udp": "block"}) as r:
        assert r.status == 403
        assert "api.keys" in (await r.json())["error"]
    assert not server.runtime.impairments.specs["udp"].block  # type: ignore[union-attr]


@pytest.mark.server_settings(dev=True, api_keys=(), workers=1)
async def test_impairment_is_open_on_a_loopback_only_api(server: RunningServer) -> None:
    url = f"{server.api_base}/dev/v1/impairment"
    async with aiohttp.ClientSession() as session, session.put(url, json={"udp": "loss:5"}) as r:
        assert r.status == 200


# ---- 10. TLS handshakes per source -----------------------------------------------------------


async def _tls_hello(server: RunningServer, source: str) -> bool:
    ctx = client_ssl_context()
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(*server.address_of("tls"), ssl=ctx, local_addr=(source, 0)),
            5,
        )
    except (OSError, ssl.SSLError, TimeoutError):
        return False
    writer.close()
    return True


@pytest.mark.server_settings(tls_handshake_rate=5.0, tls_handshake_burst=10)
async def test_tls_handshakes_are_rate_limited_per_source(server: RunningServer) -> None:
    flood = await asyncio.gather(*(_tls_hello(server, "127.0.0.1") for _ in range(60)))
    assert 10 <= sum(flood) <= 20, sum(flood)
    assert server.runtime.stream_refusals.get("tls_rate_limited", 0) >= 40
    # another address is not held back by the flood
    assert all(await asyncio.gather(*(_tls_hello(server, "127.0.0.2") for _ in range(5))))


# ---- 9. admin paths quoted -----------------------------------------------------------------


NAMES = ["eve/x", "eve/../x", "eve?x", "eve#x", "eve%2Fx", "eve%x", "..x"]


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_admin_names_with_slashes_dots_and_queries(tmp_path: Path) -> None:
    """Through the supervisor of the default worker count: revoking and lifting users
    whose names hold / .. ? # % reaches exactly them on every worker, and a crafted
    revocation path never ends an allocation."""
    admin = free_port(socket.SOCK_STREAM)
    mport = free_port(socket.SOCK_STREAM)
    token = "admin-token-quoting-test"
    lo = 26000 + os.getpid() % 500
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{admin}/admin/v1"
    with turnserver_process(
        tmp_path,
        *loopback_args(SECRET, lo, lo + 99),
        "--probe-interval",
        "0",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--admin-token",
        token,
        workers=None,
        metrics=f"127.0.0.1:{mport}",
    ) as server:
        await eventually(lambda: _ready(mport), 15)
        victim = await _allocate(server.port, "bystander")
        assert isinstance(victim, TurnClient)
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"{base}/allocations") as resp:
                alloc_id = (await resp.json())["allocations"][0]["id"]
            crafted = f"{base}/revocations/..%2Fallocations%2F{alloc_id}"
            async with session.delete(crafted) as resp:
                assert resp.status in (400, 404)
            assert await victim.refresh(600) == 600  # still there
            for name in NAMES:
                async with session.post(
                    f"{base}/revocations", json={"user": name, "for": "1h"}
                ) as resp:
                    assert resp.status == 201, (name, await resp.text())
                assert await _allocate(server.port, name) == 403, name
            async with session.get(f"{base}/revocations") as resp:
                listed = {r["user"] for r in (await resp.json())["revocations"]}
            assert listed == set(NAMES)
            for name in NAMES:
                from urllib.parse import quote

                async with session.delete(f"{base}/revocations/{quote(name, safe='')}") as resp:
                    assert resp.status == 200, (name, await resp.text())
                ok = await _allocate(server.port, name)
                assert isinstance(ok, TurnClient), (name, ok)
                ok.close()
            for bad in ("eve\u202ex", "..", "."):  # a bidi override hides in logs; .. in paths
                async with session.post(
                    f"{base}/revocations", json={"user": bad, "for": "1h"}
                ) as resp:
                    assert resp.status == 400, bad
        victim.close()


async def _ready(port: int) -> bool:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}/readyz") as r,
    ):
        return r.status == 200


async def _allocate(port: int, user: str) -> TurnClient | int | None:
    cred = mint(SECRET, user, 600, time.time())
    c = await TurnClient.connect("udp", ("127.0.0.1", port), cred.username, cred.password)
    try:
        await c.allocate()
        return c
    except TurnClientError as exc:
        c.close()
        return exc.code


# ---- 2. idle HTTP connections cannot exhaust descriptors ------------------------------------


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_idle_http_connections_cannot_exhaust_descriptors(
    tmp_path: Path, workers: int | None
) -> None:
    """RLIMIT_NOFILE 512 and 1,500 silent connections to the API, admin and metrics
    listeners: Allocates still succeed, /healthz (the liveness probe) still answers, the
    refusals are counted and logged once."""
    mport, api, admin = (free_port(socket.SOCK_STREAM) for _ in range(3))
    lo = 26500 + os.getpid() % 400
    env = dict(os.environ)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    from turnserver.testing import serve_command, stop_process

    port = free_port()
    cmd = serve_command(
        port,
        *loopback_args(SECRET, lo, lo + 199),
        "--probe-interval",
        "0",
        "--api-listen",
        f"127.0.0.1:{api}",
        "--api-key",
        "k",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--admin-token",
        "t" * 24,
        workers=workers,
        metrics=f"127.0.0.1:{mport}",
    )
    log_path = tmp_path / "serve.log"
    import subprocess

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=low_limit,
            env=env,
        )
    idle: list[socket.socket] = []
    try:
        await eventually(lambda: _ready(mport), 20)
        for target in (api, admin, mport) * 500:
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", target))
            idle.append(s)
        await asyncio.sleep(1.0)
        got = [await _allocate(port, f"still-{i}") for i in range(20)]
        assert all(isinstance(g, TurnClient) for g in got), got
        for g in got:
            if isinstance(g, TurnClient):
                g.close()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{mport}/healthz") as resp,
        ):
            assert resp.status == 200
        for s in idle:
            s.close()
        idle.clear()

        async def counted() -> dict[str, Any]:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{mport}/metrics") as resp,
            ):
                text = await resp.text()
            refused = [
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("turn_http_connections_refused_total{")
            ]
            return {"refused": sum(refused)} if sum(refused) >= 100 else {}

        await eventually(counted, 10, interval=0.5)
        log = log_path.read_text()
        assert log.count("(counted in turn_http_connections_refused_total") <= 6, log[-2000:]
        assert "Traceback" not in log
    finally:
        for s in idle:
            s.close()
        stop_process(proc)


# ---- 5. a reloaded bandwidth limit reaches live allocations ---------------------------------


async def test_a_reloaded_bandwidth_limit_applies_to_live_allocations(
    server: RunningServer, echo_peer: tuple[tuple[str, int], Any]
) -> None:
    """SIGHUP with allocations.bandwidth_kbps 80 (10 KB/s): a live allocation that was
    unlimited is limited at once (it kept 1,940 KB/s, refreshed, before)."""
    from dataclasses import replace

    from turnserver.ops.process.runtime_setup import apply_reload

    cred = mint(SECRET, "heavy", 600, time.time())
    c = await TurnClient.connect("udp", server.address, cred.username, cred.password)
    await c.allocate()
    await c.channel_bind(0x4000, echo_peer[0])
    payload = b"x" * 1000
    for _ in range(50):  # 50 KB unlimited: all of it echoed
        c.send_channel(0x4000, payload)
        await c.receive(2)
    apply_reload(server.runtime, replace(server.settings, bandwidth_kbps=80))
    alloc = next(iter(server.runtime.core.allocations.values()))
    assert alloc.rate == 10_000
    dropped_before = server.runtime.core.stats.dropped_rate_limited
    for _ in range(100):  # 100 KB at once: the bucket holds 10 KB
        c.send_channel(0x4000, payload)
    await asyncio.sleep(0.3)
    dropped = server.runtime.core.stats.dropped_rate_limited - dropped_before
    assert dropped >= 80, dropped
    c.close()
