"""Tenants and usage records with clients we did not write (coturn's uclient, aioice),
a webhook receiver the test starts, the default worker count and one worker:

- two tenants with their own secrets and quotas;
- a tenant's monthly bytes reached mid-call (the call goes on, new allocations 486);
- the webhook down for 30 s under 50 relaying clients, and a restart while it is down:
  every record arrives, none twice once deduplicated by id;
- kill -9 of a worker: its allocations get stop records (cause worker_crash).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioice import turn

from tests.support import WORKER_COUNTS, Collector, eventually
from tests.support.endpoints import RecordReceiver
from tests.support.procs import ServerProcess, background, free_port, turnserver_process
from tests.support.server import free_port_range, require_tool
from tests.support.uclient import UclientResult
from turnserver.ops.http.credentials import mint
from turnserver.testing.processes import process_tree

pytestmark = pytest.mark.one_loop  # the server is a subprocess: one client loop will do

ACME, BETA, TOP = "acme-secret-1", "beta-secret-1", "top-secret-1"
ADMIN = "ops:admin-token-0123456789"
ACME_SID, ACME_TOKEN = "ACacme0000000000000000000000000001", "acme-auth-token-01234"
ACME_KEY = "acme-api-key-0123456789"


def _config(tmp: Path, *, monthly: str = "0", webhook: str = "", api: int = 0) -> Path:
    lo, hi = free_port_range(300)
    api_block = f"api:\n  listen: 127.0.0.1:{api}\n" if api else ""
    hook = f"  webhook:\n    url: {webhook}\n    timeout: 2\n    retry_max: 2\n" if webhook else ""
    state = tmp / "state"
    text = f"""
realm: example.org
auth:
  secrets: [{TOP}]
peers:
  allow_loopback: true
relay:
  min_port: {lo}
  max_port: {hi}
admin:
  listen: 127.0.0.1:{free_port()}
  tokens: ["{ADMIN}"]
tenants:
  acme:
    realm: acme.example
    secrets: [{ACME}]
    accounts: ["{ACME_SID}:{ACME_TOKEN}"]
    api_keys: ["{ACME_KEY}"]
    quotas:
      max_allocations: 3
  beta:
    realm: beta.example
    secrets: [{BETA}]
    users:
      - name: bob
        password: bob-pw
    quotas:
      monthly_bytes: {monthly}
      monthly_action: refuse
usage:
  state_dir: {state}
  file: {tmp / "usage.jsonl"}
  interim_interval: 1
{hook}
{api_block}"""
    path = tmp / "turnserver.yaml"
    path.write_text(text)
    return path


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _records(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "usage.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _admin_port(config: Path) -> int:
    for line in config.read_text().splitlines():
        if "listen: 127.0.0.1:" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError("no admin listener")


@contextmanager
def _server(tmp: Path, config: Path, workers: int | None, metrics: int) -> Iterator[ServerProcess]:
    with turnserver_process(
        tmp,
        "--config",
        str(config),
        "--log-level",
        "info",
        workers=workers,
        streams=True,
        metrics=f"127.0.0.1:{metrics}",
    ) as server:
        yield server


async def _metrics(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        return await resp.text()


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def _allocate(port: int, username: str, password: str) -> tuple[Any, Collector]:
    transport, proto = await turn.create_turn_endpoint(
        Collector, server_addr=("127.0.0.1", port), username=username, password=password
    )
    return transport, proto


async def _relay(transport: Any, proto: Collector, peer: tuple[str, int], count: int) -> None:
    for i in range(count):
        payload = b"%05d" % i + b"x" * 495
        transport.sendto(payload, peer)
        assert await asyncio.wait_for(proto.queue.get(), 3) == payload


def _uclient(port: int, peer_port: int, *args: str) -> UclientResult:
    uclient = require_tool("turnutils_uclient")
    cmd = [uclient, "-p", str(port), "-r", str(peer_port), "-e", "127.0.0.1", "-X", "-g", *args]
    done = subprocess.run([*cmd, "127.0.0.1"], capture_output=True, text=True, timeout=180)
    return UclientResult(list(args), done.stdout + done.stderr)


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_two_tenants_own_secrets_and_quotas(tmp_path: Path, workers: int | None) -> None:
    peer_bin = require_tool("turnutils_peer")
    config = _config(tmp_path)
    metrics, peer_port = free_port(), free_port()
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo.get_extra_info("sockname")
    with (
        background([peer_bin, "-L", "127.0.0.1", "-p", str(peer_port)]),
        _server(tmp_path, config, workers, metrics) as server,
    ):
        # uclient with beta's secret and with the server's own (uclient leaves one
        # allocation of each run behind: it lives until its lifetime or our stop)
        beta, top = await asyncio.gather(  # (at once: the suite's time)
            asyncio.to_thread(
                _uclient, server.port, peer_port, "-u", "beta-user", "-W", BETA, "-m", "5",
                "-n", "20",
            ),
            asyncio.to_thread(
                _uclient, server.port, peer_port, "-u", "top-user", "-W", TOP, "-m", "2",
                "-n", "20",
            ),
        )  # fmt: skip
        assert beta.lost_packets == 0 and beta.recv_bytes > 0, beta.output[-2000:]
        assert top.lost_packets == 0 and top.recv_bytes > 0, top.output[-2000:]
        # aioice: acme holds 3 allocations, a 4th is refused (486); beta's static user
        # (under the realm the 401 named) still allocates
        held = []
        for i in range(3):
            cred = mint(ACME, f"a{i}", 600, time.time())
            held.append(await _allocate(server.port, cred.username, cred.password))
        cred = mint(ACME, "a3", 600, time.time())
        with pytest.raises(Exception, match="486"):
            await _allocate(server.port, cred.username, cred.password)
        bob = await _allocate(server.port, "bob", "bob-pw")
        await _relay(*bob, peer, 10)
        await _relay(*held[0], peer, 10)
        # the admin API lists one tenant's allocations
        headers = {"Authorization": f"Bearer {ADMIN.split(':', 1)[1]}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            base = f"http://127.0.0.1:{_admin_port(config)}/admin/v1/allocations"
            async with session.get(base, params={"tenant": "acme"}) as resp:
                listed = (await resp.json())["allocations"]
        assert len(listed) == 3 and {a["tenant"] for a in listed} == {"acme"}
        text = await _metrics(metrics)
        assert _value(text, 'turn_tenant_allocations_active{tenant="acme"}') == 3
        assert _value(text, 'turn_tenant_allocations_total{tenant="acme"}') == 3
        assert _value(text, 'turn_tenant_allocations_total{tenant="beta"}') >= 6
        assert _value(text, 'turn_tenant_allocations_total{tenant="default"}') >= 2
        failures = 'turn_tenant_allocation_failures_total{reason="quota_tenant",tenant="acme"}'
        assert _value(text, failures) == 1
        for tenant in ("acme", "beta", "default"):
            moved = f'turn_tenant_relayed_bytes_total{{direction="to_client",tenant="{tenant}"}}'
            assert _value(text, moved) > 0, tenant
        for transport, _ in [*held, bob]:
            transport.close()
    echo.close()
    records = _records(tmp_path)
    by_allocation: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_allocation.setdefault(r["allocation_id"], []).append(r)
    tenants = [rs[0]["tenant"] for rs in by_allocation.values()]
    assert (
        tenants.count("acme") == 3 and tenants.count("beta") >= 6 and tenants.count("default") >= 2
    )
    for rs in by_allocation.values():  # each: a start, interims, one stop (the server stopped)
        kinds = [r["kind"] for r in sorted(rs, key=lambda r: r["seq"])]
        assert kinds[0] == "start" and kinds[-1] == "stop" and kinds.count("stop") == 1, kinds
        assert {r["tenant"] for r in rs} == {rs[0]["tenant"]}
    assert len({r["id"] for r in records}) == len(records)
    uclient = [r for r in records if r["kind"] == "stop" and r["user"].endswith("-user")]
    assert sum(r["bytes_to_peer"] for r in uclient) >= beta.sent_bytes + top.sent_bytes
    bobs = [r for r in records if r["kind"] == "stop" and r["user"] == "bob"]
    assert len(bobs) == 1 and bobs[0]["tenant"] == "beta" and bobs[0]["bytes_to_peer"] == 5000


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_monthly_bytes_reached_mid_call(tmp_path: Path, workers: int | None) -> None:
    """What happens to the live call: it goes on to its end (refreshes included); new
    allocations of the tenant get 486 until the month ends; other tenants are not held."""
    config = _config(tmp_path, monthly="100kB")
    metrics = free_port()
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo.get_extra_info("sockname")
    with _server(tmp_path, config, workers, metrics) as server:
        cred = mint(BETA, "caller", 600, time.time())
        call = await _allocate(server.port, cred.username, cred.password)
        await _relay(*call, peer, 150)  # 150 kB each way: past 100 kB

        async def refused() -> bool:
            fresh = mint(BETA, "late", 600, time.time())
            try:
                transport, _ = await _allocate(server.port, fresh.username, fresh.password)
            except Exception as exc:
                assert "486" in str(exc), exc
                return True
            transport.close()
            return False

        await eventually(refused, timeout=20, interval=0.5, what="beta's new allocation refused")
        await _relay(*call, peer, 50)  # the call itself goes on
        other = mint(ACME, "other", 600, time.time())
        transport, proto = await _allocate(server.port, other.username, other.password)
        await _relay(transport, proto, peer, 5)
        transport.close()
        text = await _metrics(metrics)
        assert _value(text, 'turn_tenant_month_exceeded{tenant="beta"}') == 1
        assert _value(text, 'turn_tenant_month_bytes{tenant="beta"}') >= 100_000
        reason = 'turn_tenant_allocation_failures_total{reason="quota_tenant_month",tenant="beta"}'
        assert _value(text, reason) >= 1
        call[0].close()
    echo.close()
    log = server.log()
    assert "tenant beta used its 100000 bytes for the month" in log


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_webhook_down_30s_under_50_clients_then_a_restart(
    tmp_path: Path, workers: int | None
) -> None:
    peer_bin = require_tool("turnutils_peer")
    receiver = RecordReceiver()
    config = _config(tmp_path, webhook=receiver.url)
    metrics, peer_port = free_port(), free_port()
    await receiver.up()
    went_down = 0.0
    try:
        with (
            background([peer_bin, "-L", "127.0.0.1", "-p", str(peer_port)]),
            _server(tmp_path, config, workers, metrics) as server,
        ):
            await receiver.down()
            went_down = time.monotonic()
            result = await asyncio.to_thread(
                _uclient, server.port, peer_port, "-u", "u", "-W", TOP,
                "-m", "50" if workers is None else "20", "-n", "100", "-l", "120",
            )  # fmt: skip
            assert result.lost_packets == 0, result.output[-2000:]
            text = await _metrics(metrics)
            assert _value(text, 'turn_usage_sink_queued_bytes{sink="webhook"}') > 0
            assert _value(text, 'turn_usage_sink_sent_total{sink="file"}') >= 100
        # a restart while the receiver is still away: the spool keeps what waits
        with _server(tmp_path, config, workers, metrics):
            # 30 s with the default worker count (the figure); one worker goes
            # the same way through a shorter outage (the suite's time: .ci/run < 20 min)
            outage = 30 if workers is None else 8
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - went_down)))
            await receiver.up()
            expected = {r["id"] for r in _records(tmp_path)}
            assert len(expected) >= 60  # starts, stops, interims

            def delivered() -> bool:
                return expected <= set(receiver.records)

            await eventually(delivered, timeout=60, interval=0.2, what="every record delivered")
    finally:
        await receiver.down()
    records = list(receiver.records.values())
    assert {r["id"] for r in records} == {r["id"] for r in _records(tmp_path)}
    starts = {r["allocation_id"] for r in records if r["kind"] == "start"}
    stops = {r["allocation_id"] for r in records if r["kind"] == "stop"}
    assert (
        len(starts) >= (50 if workers is None else 20) and starts == stops
    )  # (uclient makes more)
    duplicates = sum(n - 1 for n in receiver.ids.values())
    assert duplicates <= receiver.batches  # at most a batch again per interrupted delivery


def _worker_pids(server: ServerProcess) -> dict[int, int]:
    """worker index -> pid, from the supervisor's log ("worker 1 started (pid 123)")."""
    pids: dict[int, int] = {}
    for line in server.log().splitlines():
        if " started (pid " in line and "worker " in line:
            head, pid = line.rsplit("(pid ", 1)
            pids[int(head.split("worker ")[1].split()[0])] = int(pid.rstrip(")"))
    return pids


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_kill_9_gives_stop_records_from_the_last_interim(
    tmp_path: Path, workers: int | None
) -> None:
    config = _config(tmp_path)
    metrics = free_port()
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo.get_extra_info("sockname")
    held = []
    with _server(tmp_path, config, workers, metrics) as server:
        for i in range(8):
            cred = mint(TOP, f"k{i}", 600, time.time())
            held.append(await _allocate(server.port, cred.username, cred.password))
            await _relay(*held[-1], peer, 5)

        def interims() -> dict[str, dict[str, Any]]:
            got = {
                r["allocation_id"]: r
                for r in _records(tmp_path)
                if r["kind"] == "interim" and r["bytes_to_peer"] >= 2500
            }
            return got if len(got) == 8 else {}

        last = await eventually(interims, timeout=15, what="an interim with the bytes of each")
        starts = [r for r in _records(tmp_path) if r["kind"] == "start"]
        if workers == 1:
            victims = {r["allocation_id"] for r in starts}
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
        else:
            by_worker: dict[int, set[str]] = {}
            for r in starts:
                by_worker.setdefault(r["worker"], set()).add(r["allocation_id"])
            index = max(by_worker, key=lambda w: len(by_worker[w]))
            victims = by_worker[index]
            pid = _worker_pids(server)[index]
            assert pid in process_tree(server.proc.pid)
            os.kill(pid, signal.SIGKILL)

        def crashed() -> dict[str, dict[str, Any]]:
            stops = {
                r["allocation_id"]: r
                for r in _records(tmp_path)
                if r["kind"] == "stop" and r["cause"] == "worker_crash"
            }
            return stops if set(stops) == victims else {}

        if workers == 1:  # the whole server went: its next start writes them
            with _server(tmp_path, config, workers, metrics):
                stops = await eventually(crashed, timeout=20, what="worker_crash stop records")
        else:
            stops = await eventually(crashed, timeout=20, what="worker_crash stop records")
        for aid, stop in stops.items():
            assert stop["bytes_to_peer"] == last[aid]["bytes_to_peer"]
            assert stop["duration"] >= last[aid]["duration"]
        for transport, _ in held:
            transport.close()
    echo.close()
    everything = _records(tmp_path)
    assert len({r["id"] for r in everything}) == len(everything)
    stops_per_allocation: dict[str, int] = {}
    for r in everything:
        if r["kind"] == "stop":
            stops_per_allocation[r["allocation_id"]] = (
                stops_per_allocation.get(r["allocation_id"], 0) + 1
            )
    assert set(stops_per_allocation.values()) == {1}  # one stop each, crash or not


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_sighup_adds_changes_and_removes_tenants(tmp_path: Path, workers: int | None) -> None:
    """Other tenants' allocations stay and relay; a removed tenant's secret allocates
    no more (its live allocation goes on until a Refresh needs its credentials); an
    added tenant's works; a lowered quota counts the allocations that live."""
    config = _config(tmp_path)
    metrics = free_port()
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo.get_extra_info("sockname")
    with _server(tmp_path, config, workers, metrics) as server:
        live = {}
        for name, secret in (("top", TOP), ("acme", ACME), ("beta", BETA)):
            cred = mint(secret, f"{name}-live", 600, time.time())
            live[name] = await _allocate(server.port, cred.username, cred.password)
            await _relay(*live[name], peer, 5)
        text = config.read_text()
        beta_block = text[text.index("  beta:") : text.index("usage:")]
        gamma = "  gamma:\n    realm: gamma.example\n    secrets: [gamma-secret-1]\n"
        text = text.replace(beta_block, gamma).replace("max_allocations: 3", "max_allocations: 1")
        config.write_text(text)
        rotated = tmp_path / "usage.jsonl.1"
        (tmp_path / "usage.jsonl").rename(rotated)  # logrotate moves it, then SIGHUP
        before = server.log().count("reloaded")
        server.proc.send_signal(signal.SIGHUP)
        await eventually(
            lambda: server.log().count("reloaded") >= before + (workers or os.cpu_count() or 1),
            timeout=10,
            what="every process reloaded",
        )

        async def outcome(secret: str, user: str) -> str:
            cred = mint(secret, user, 600, time.time())
            try:
                transport, _ = await _allocate(server.port, cred.username, cred.password)
            except Exception as exc:
                return "486" if "486" in str(exc) else "401" if "401" in str(exc) else str(exc)
            transport.close()
            return "ok"

        for attempt in range(4):  # on every worker (a new client socket each time)
            assert await outcome("gamma-secret-1", f"g{attempt}") == "ok"
            assert await outcome(BETA, f"b{attempt}") == "401"
            assert await outcome(ACME, f"a{attempt}") == "486"  # 1 allowed, 1 lives
        for transport, proto in live.values():  # nobody's allocation was dropped
            await _relay(transport, proto, peer, 5)
        for transport, _ in live.values():
            transport.close()
    echo.close()
    old = [json.loads(line) for line in rotated.read_text().splitlines()]
    new = _records(tmp_path)  # the file the SIGHUP reopened
    assert "start" in {r["kind"] for r in old} <= {"start", "interim"} and new
    records = old + new
    assert len({r["id"] for r in records}) == len(records)
    starts = {r["allocation_id"] for r in records if r["kind"] == "start"}
    assert starts == {r["allocation_id"] for r in records if r["kind"] == "stop"}
    stops = [r for r in records if r["kind"] == "stop" and r["user"].endswith("-live")]
    assert sorted(r["tenant"] for r in stops) == ["acme", "beta", "default"]
    assert all(
        r["bytes_to_peer"] == 5000 and r["cause"] in ("deleted", "shutdown") for r in stops
    ), [(r["bytes_to_peer"], r["cause"]) for r in stops]


@pytest.mark.parametrize("workers", WORKER_COUNTS)
@pytest.mark.parametrize("policy", ["refuse", "drop"])
async def test_a_full_spool_refuses_allocations_or_drops_records(
    tmp_path: Path, workers: int | None, policy: str
) -> None:
    """usage.spool_full (per process): refuse: new allocations get 508 while the spool
    is full, and are taken again once the sink has caught up; drop: allocations go on,
    the records that did not fit are counted and lost."""
    receiver = RecordReceiver()
    config = _config(tmp_path, webhook=receiver.url)
    text = config.read_text()
    config.write_text(
        text.replace(
            "  interim_interval: 1\n",  # (no interims: starts alone fill the spool)
            f"  interim_interval: 600\n  spool_max_bytes: 3000\n  spool_full: {policy}\n",
        )
    )
    metrics = free_port()
    held = []
    with _server(tmp_path, config, workers, metrics) as server:
        outcomes = []
        for i in range(30):  # start records (~500 bytes) fill each process's 3,000
            cred = mint(TOP, f"s{i}", 600, time.time())
            try:
                held.append(await _allocate(server.port, cred.username, cred.password))
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append("508" if "508" in str(exc) else str(exc))
        text = await _metrics(metrics)
        if policy == "refuse":
            assert "508" in outcomes and set(outcomes) <= {"ok", "508"}, outcomes
            assert _value(text, 'turn_usage_records_dropped_total{reason="spool_full"}') == 0
            await receiver.up()

            async def accepted() -> bool:
                cred = mint(TOP, "after", 600, time.time())
                try:
                    held.append(await _allocate(server.port, cred.username, cred.password))
                except Exception:
                    return False
                return True

            await eventually(accepted, timeout=20, interval=0.5, what="allocations again")
        else:
            assert outcomes == ["ok"] * 30
            assert _value(text, 'turn_usage_records_dropped_total{reason="spool_full"}') > 0
            assert _value(text, "turn_usage_spool_bytes") >= 3000
        for transport, _ in held:
            transport.close()
    await receiver.down()
    assert f"new allocations are refused (usage.spool_full: {policy})" in server.log() or (
        policy == "drop" and "new records are dropped and counted" in server.log()
    )


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_a_tenants_accounts_and_keys_mint_its_credentials(
    tmp_path: Path, workers: int | None
) -> None:
    """The Tokens API (Twilio's shape) for a tenant's account, and the REST API for a
    tenant's key, mint with the tenant's secret: the allocations are the tenant's."""
    api = free_port()
    config = _config(tmp_path, api=api)
    metrics = free_port()
    with _server(tmp_path, config, workers, metrics) as server:
        base = f"http://127.0.0.1:{api}"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/2010-04-01/Accounts/{ACME_SID}/Tokens.json",
                headers={"Authorization": _basic(ACME_SID, ACME_TOKEN)},
            ) as resp:
                assert resp.status == 201
                token = await resp.json()
            async with session.get(
                f"{base}/api/v1/turn-credentials",
                params={"username": "keyed"},
                headers={"X-API-Key": ACME_KEY},
            ) as resp:
                assert resp.status == 200
                keyed = await resp.json()
            async with session.post(
                f"{base}/2010-04-01/Accounts/{ACME_SID}/Tokens.json",
                headers={"Authorization": _basic(ACME_SID, "wrong")},
            ) as resp:
                assert resp.status == 401
        for username, password in (
            (token["username"], token["password"]),
            (keyed["username"], keyed["password"]),
        ):
            transport, _ = await _allocate(server.port, username, password)
            transport.close()
        text = await _metrics(metrics)
        assert _value(text, 'turn_tenant_allocations_total{tenant="acme"}') == 2
        assert _value(text, 'turn_tenant_allocations_total{tenant="default"}') == 0
