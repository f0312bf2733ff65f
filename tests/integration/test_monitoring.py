"""Metrics, health and the self-probe, checked through HTTP and a real Prometheus."""

from __future__ import annotations

import asyncio
import atexit
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import free_port
from tests.support.server import SECRET, RunningServer, free_port_range, require_tool
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.ops.config.tenants import TenantSettings
from turnserver.ops.http.credentials import mint
from turnserver.stun import Attr, Method

ROOT = Path(__file__).parents[2]
LO, _ = free_port_range()


async def scrape(server: RunningServer) -> dict[str, float]:
    """Sample name + sorted labels -> value."""
    url = f"http://127.0.0.1:{server.server.health.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


async def client(
    server: RunningServer, user: str = "u", *, password: str | None = None, transport: str = "udp"
) -> TurnClient:
    cred = mint(SECRET, user, 600, time.time())
    return await TurnClient.connect(
        transport,
        server.address_of(transport),
        cred.username,
        password if password is not None else cred.password,
    )


async def expect_code(coro: object, code: int) -> None:
    with pytest.raises(TurnClientError) as info:
        await coro  # type: ignore[misc]
    assert info.value.code == code, info.value


@pytest.mark.server_settings(max_allocations_per_user=1, max_allocations=2)
async def test_each_failure_reason_moves_its_counter(server: RunningServer) -> None:
    opened: list[TurnClient] = []
    try:
        a1 = await client(server, "alice")
        opened.append(a1)
        await a1.allocate()  # also takes the first, unauthenticated 401
        await expect_code(a1.allocate(), 437)  # allocation_mismatch
        a2 = await client(server, "alice")
        opened.append(a2)
        await expect_code(a2.allocate(), 486)  # quota_user
        b = await client(server, "bob")
        opened.append(b)
        await b.allocate()
        await expect_code(b.create_permission(("10.1.2.3", 1)), 403)  # peer policy
        c = await client(server, "carol")
        opened.append(c)
        await expect_code(c.allocate(), 486)  # quota_total
        await expect_code(c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 132)]), 442)
        await expect_code(c.request(Method.ALLOCATE, []), 400)  # bad_request
        wrong = await client(server, "dave", password="wrong")
        opened.append(wrong)
        await expect_code(wrong.allocate(), 401)  # bad_credentials
        old = mint(SECRET, "erin", 60, time.time() - 3600)
        expired = await TurnClient.connect("udp", server.address, old.username, old.password)
        opened.append(expired)
        await expect_code(expired.allocate(), 401)  # expired_credentials
        await a1.refresh(0)  # make room under max_allocations
        stale = await client(server, "frank")

        opened.append(stale)
        stale.realm, stale.nonce = server.settings.realm, "ffffffff" + "0" * 24
        await stale.allocate()  # 438 first, then succeeds with the fresh nonce
        await expect_code(stale.allocate(), 437)
    finally:
        for c_ in opened:
            c_.close()
    m = await scrape(server)
    fails = "turn_allocation_failures_total{{code={},reason={},transport=udp}}"
    for code, reason in [
        (401, "unauthenticated"),
        (401, "bad_credentials"),
        (401, "expired_credentials"),
        (438, "stale_nonce"),
        (486, "quota_user"),
        (486, "quota_total"),
        (442, "unsupported_transport"),
        (437, "allocation_mismatch"),
        (400, "bad_request"),
    ]:
        assert m.get(fails.format(code, reason), 0) >= 1, (code, reason)
    for reason in ("bad_credentials", "expired_credentials", "stale_nonce", "unauthenticated"):
        assert m[f"turn_auth_failures_total{{reason={reason}}}"] >= 1
    assert m["turn_peer_denied_total{reason=policy}"] == 1
    assert m["turn_requests_total{method=create_permission,result=403}"] == 1
    assert m["turn_allocations_total{transport=udp}"] == 3
    assert m["turn_request_duration_seconds_count{method=allocate}"] >= 10
    assert m["turn_build_info{version=0.1.0}"] == 1


@pytest.mark.server_settings(min_port=LO, max_port=LO)
async def test_port_exhaustion_is_counted(server: RunningServer) -> None:
    a = await client(server, "a")
    b = await client(server, "b")
    try:
        await a.allocate()
        await expect_code(b.allocate(), 508)
        m = await scrape(server)
        assert m["turn_allocation_failures_total{code=508,reason=no_relay_port,transport=udp}"] == 1
        assert m["turn_relay_ports_free{}"] == 0
        assert m["turn_allocations_active{family=ipv4,transport=udp}"] == 1
    finally:
        a.close()
        b.close()


@pytest.mark.server_settings(probe_interval=3600, min_port=LO, max_port=LO + 2)
async def test_readyz_follows_the_probe(server: RunningServer) -> None:
    probe = server.server.probe
    assert probe is not None
    base = f"http://127.0.0.1:{server.server.health.port}"
    for _ in range(100):
        if probe.runs:
            break
        await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200, body
        assert set(body["checks"]["probe"]["listeners"]) == {
            str(s) for s in server.runtime.bound_addresses()
        }
        async with session.get(f"{base}/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        # Users take all three relay ports: the probe cannot allocate (508)
        users = [await client(server, f"user{i}") for i in range(3)]
        for u in users:
            await u.allocate()
        await probe.run_once()
        async with session.get(f"{base}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503 and body["failed"] == ["probe"]
            assert "508" in body["checks"]["probe"]["error"]
        m = await scrape(server)
        assert m["turn_probe_success{transport=udp}"] == 0
        for u in users:
            await u.refresh(0)
            u.close()
        await probe.run_once()
        async with session.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        m = await scrape(server)
        assert m["turn_probe_success{transport=tls}"] == 1
        assert 0 < m["turn_probe_rtt_seconds{transport=udp}"] < 1
        # The probe's own traffic stays out of user metrics
        assert m["turn_allocations_total{transport=udp}"] == 3


def _referenced_metrics() -> set[str]:
    exprs: list[str] = []
    dashboard = json.loads((ROOT / "config/grafana/turnserver-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel["targets"]]
    exprs.append((ROOT / "config/prometheus/alerts.yml").read_text())
    names: set[str] = set()
    for expr in exprs:
        names |= set(re.findall(r"\b(turn_[a-z0-9_]+)", expr))
    return names


def test_promtool_checks_and_tests_the_rules() -> None:
    promtool = require_tool("promtool")
    rules = ROOT / "config/prometheus"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(
            [promtool, *args], cwd=rules, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout


_USAGE_DIR = tempfile.mkdtemp(prefix="turnserver-usage-")  # removed at exit
atexit.register(shutil.rmtree, _USAGE_DIR, True)


@pytest.mark.server_settings(
    probe_interval=3600,
    admin_listen=("127.0.0.1", 0),
    admin_tokens=("ops:monitoring-admin-token",),
    # the tenant, usage record and hook panels: their series exist when configured
    tenants=(TenantSettings("acme", "acme.example", secrets=("a",), monthly_bytes=10**12),),
    usage_state_dir=_USAGE_DIR,
    usage_file=f"{_USAGE_DIR}/usage.jsonl",
    auth_hook_url="http://127.0.0.1:9/",
)
async def test_dashboard_and_rules_use_only_exported_metrics(
    server: RunningServer, echo_peer: tuple[tuple[str, int], object]
) -> None:
    assert server.server.admin is not None  # its panel's metric needs one request
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{server.server.admin.port}/admin/v1/summary",
            headers={"Authorization": "Bearer monitoring-admin-token"},
        ) as resp,
    ):
        assert resp.status == 200
    c = await client(server, "metrics")
    await c.allocate()
    await c.create_permission(echo_peer[0])
    await c.channel_bind(0x4000, echo_peer[0])
    c.send_channel(0x4000, b"x")
    await c.receive(2)
    await c.refresh(0)
    c.close()
    bad = await client(server, "x", password="nope")
    await expect_code(bad.allocate(), 401)
    bad.close()
    await expect_code((await client(server, "p")).create_permission(("10.0.0.1", 1)), 437)
    m = await scrape(server)
    exported = {key.split("{")[0] for key in m}
    missing = sorted(n for n in _referenced_metrics() if n not in exported)
    assert not missing, f"used in dashboard/rules but not exported: {missing}"


async def test_real_prometheus_scrapes_us(server: RunningServer) -> None:
    prometheus = require_tool("prometheus")
    metrics_port = server.server.health.port
    live = await client(server, "live")
    await live.allocate()
    for _ in range(3):
        wrong = await client(server, "w", password="wrong")
        await expect_code(wrong.allocate(), 401)
        wrong.close()
    prom_port = free_port(__import__("socket").SOCK_STREAM)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: turnserver\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}']\n"
        )
        proc = await asyncio.create_subprocess_exec(
            prometheus,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp}/data",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            api = f"http://127.0.0.1:{prom_port}/api/v1/query"
            results: dict[str, float] = {}
            queries = {
                "failures": 'sum(turn_allocation_failures_total{reason="bad_credentials"})',
                "active": "sum(turn_allocations_active)",
                "up": 'up{job="turnserver"}',
            }
            deadline = time.monotonic() + 30
            async with aiohttp.ClientSession() as session:
                while time.monotonic() < deadline and len(results) < len(queries):
                    for name, query in queries.items():
                        try:
                            async with session.get(api, params={"query": query}) as resp:
                                data = await resp.json()
                        except aiohttp.ClientError:
                            continue
                        vector = data.get("data", {}).get("result", [])
                        if vector:
                            results[name] = float(vector[0]["value"][1])
                    await asyncio.sleep(0.5)
            assert results == {"failures": 3.0, "active": 1.0, "up": 1.0}, results
        finally:
            proc.terminate()
            await proc.wait()
            live.close()
