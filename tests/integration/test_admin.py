"""The admin API and `turnserver admin`: list who relays (with counters), end one
allocation, revoke a user (on one process and across workers, persisted in a file that
survives restarts and is re-read on SIGHUP), and every refusal without a 500."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioice import turn

from tests.support import Collector
from tests.support.procs import free_port, loopback_args, run_cli, turnserver_process
from tests.support.server import API_KEY, SECRET, EchoProtocol, RunningServer, require_tool
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.ops.http.credentials import mint

TOKEN = "admin-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
ADMIN = pytest.mark.server_settings(admin_listen=("127.0.0.1", 0), admin_tokens=(f"ops:{TOKEN}",))


def _base(server: RunningServer) -> str:
    assert server.server.admin is not None
    return f"http://127.0.0.1:{server.server.admin.port}/admin/v1"


async def _client(server: RunningServer, user: str, secret: str = SECRET) -> TurnClient:
    cred = mint(secret, user, 600, time.time())
    c = await TurnClient.connect("udp", server.address, cred.username, cred.password, timeout=3)
    await c.allocate()
    return c


async def _code(coro: Any) -> int | None:
    try:
        await coro
    except TurnClientError as exc:
        return exc.code
    return 0


async def _get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.get(url, **kw) as resp:
        return resp.status, await resp.json()


@ADMIN
async def test_list_kill_and_counters(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    base = _base(server)
    alice = await _client(server, "alice")
    bob = await _client(server, "bob")
    # aioice, a client we did not write, relays too
    cred = mint(SECRET, "carol", 600, time.time())
    carol, collector = await turn.create_turn_endpoint(
        Collector, server_addr=server.address, username=cred.username, password=cred.password
    )
    queue = collector.queue
    try:
        for c in (alice, bob):
            await c.channel_bind(0x4000, echo_peer[0])
        for i in range(5):
            alice.send_channel(0x4000, b"a" * 100)
            await alice.receive(2)
            carol.sendto(b"c%d" % i, echo_peer[0])
            await asyncio.wait_for(queue.get(), 3)
        async with aiohttp.ClientSession(headers=HEADERS) as session:
            status, body = await _get(session, f"{base}/allocations")
            assert status == 200
            by_user = {a["user"]: a for a in body["allocations"]}
            assert set(by_user) == {"alice", "bob", "carol"}
            a = by_user["alice"]
            assert a["packets_to_peer"] == 5 and a["bytes_to_peer"] == 500
            assert a["bytes_to_client"] == 500 and a["transport"] == "udp"
            assert a["channels"][0]["number"] == "0x4000" and a["relayed"]
            assert by_user["carol"]["packets_to_peer"] == 5
            # filters and pages
            status, body = await _get(session, f"{base}/allocations", params={"user": "bob"})
            assert [x["user"] for x in body["allocations"]] == ["bob"]
            status, page = await _get(session, f"{base}/allocations", params={"limit": "2"})
            assert len(page["allocations"]) == 2 and page["next_cursor"]
            status, rest = await _get(
                session, f"{base}/allocations", params={"cursor": page["next_cursor"]}
            )
            ids = [x["id"] for x in page["allocations"] + rest["allocations"]]
            assert len(set(ids)) == 3
            status, one = await _get(session, f"{base}/allocations/{a['id']}")
            assert status == 200 and one["user"] == "alice"
            # end alice's allocation: her next request gets 437; bob loses nothing
            async with session.delete(f"{base}/allocations/{a['id']}") as resp:
                assert resp.status == 200
            assert await _code(alice.refresh(600)) == 437
            for i in range(5):
                bob.send_channel(0x4000, b"b%d" % i)
                assert (await bob.receive(2))[1] == b"b%d" % i
            status, summary = await _get(session, f"{base}/summary")
            assert summary["allocations"] == 2 and summary["workers"] == 1
        registry = server.server.metrics.registry
        value = registry.get_sample_value(
            "turn_admin_requests_total", {"action": "end", "status": "200"}
        )
        assert value == 1.0
    finally:
        carol.close()
        alice.close()
        bob.close()


@ADMIN
async def test_revoke_ends_allocations_and_refuses_new_ones(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="turnserver")
    base = _base(server)
    victims = [await _client(server, "mallory") for _ in range(2)]
    other = await _client(server, "trent")
    try:
        async with aiohttp.ClientSession(headers=HEADERS) as session:
            async with session.post(
                f"{base}/revocations", json={"user": "mallory", "for": "2h", "reason": "abuse"}
            ) as resp:
                body = await resp.json()
                assert resp.status == 201 and body["ended"] == 2
                assert "warning" in body  # no revocations file: kept in memory only
            for v in victims:  # ended; and a revoked user's requests get 403
                assert await _code(v.refresh(600)) == 403
            assert not [a for a in server.runtime.core.allocations.values() if a.user == "mallory"]
            fresh = mint(SECRET, "mallory", 600, time.time())
            c = await TurnClient.connect("udp", server.address, fresh.username, fresh.password)
            try:
                with pytest.raises(TurnClientError) as refused:
                    await c.allocate()
                assert refused.value.code == 403
                assert "revoked" in refused.value.reason.lower()
            finally:
                c.close()
            assert await other.refresh(600) == 600  # an unrevoked user is unaffected
            _status, listed = await _get(session, f"{base}/revocations")
            assert [r["user"] for r in listed["revocations"]] == ["mallory"]
            async with session.delete(f"{base}/revocations/mallory") as resp:
                assert resp.status == 200
            again = await _client(server, "mallory")
            again.close()
        registry = server.server.metrics.registry
        value = registry.get_sample_value(
            "turn_allocation_failures_total",
            {"transport": "udp", "code": "403", "reason": "revoked"},
        )
        assert value == 1.0
        assert any("admin revoked user=mallory" in r.getMessage() for r in caplog.records)
        assert any("by=ops" in r.getMessage() for r in caplog.records)
    finally:
        for v in victims:
            v.close()
        other.close()


@ADMIN
async def test_refusals_are_json_and_never_500(server: RunningServer) -> None:
    base = _base(server)
    async with aiohttp.ClientSession() as session:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-000000000"},
            {"Authorization": f"Bearer {API_KEY}"},
            {"X-API-Key": TOKEN},
        ):
            async with session.get(f"{base}/allocations", headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        cases = [
            ("POST", "/revocations", b"{not json", 400),
            ("POST", "/revocations", b"[1, 2]", 400),
            ("POST", "/revocations", b'{"user": "x"}', 400),
            ("POST", "/revocations", b'{"user": "x", "until": 5}', 400),
            ("POST", "/revocations", b'{"user": "", "for": "1h"}', 400),
            ("POST", "/revocations", b"x" * 20000, 413),
            ("GET", "/allocations/w0-nope", b"", 404),
            ("DELETE", "/allocations/w0-nope", b"", 404),
            ("DELETE", "/revocations/nobody", b"", 404),
            ("GET", "/allocations?limit=0", b"", 400),
            ("GET", "/allocations?limit=x", b"", 400),
            ("GET", "/allocations?transport=sctp", b"", 400),
            ("GET", "/allocations?fleet=1", b"", 400),  # not in a fleet
            ("DELETE", "/allocations/other~w0-nope", b"", 404),
            ("GET", "/nothing-here", b"", 404),
        ]
        for method, path, data, expected in cases:
            async with session.request(method, base + path, data=data, headers=HEADERS) as resp:
                assert resp.status == expected, (method, path, await resp.text())
                assert "error" in await resp.json()
    assert server.server.admin is not None
    statuses = {status for (_, status) in server.server.admin.api.stats.requests}
    assert 500 not in statuses


def _admin_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("admin", "--server", url, "--token", TOKEN, *args)


def _uclient_in_background(port: int, seconds: float) -> threading.Thread:
    uclient = require_tool("turnutils_uclient")
    peer = require_tool("turnutils_peer")
    peer_port = free_port()
    peer_proc = subprocess.Popen(
        [peer, "-L", "127.0.0.1", "-p", str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def run() -> None:
        try:
            subprocess.run(
                [
                    uclient,
                    "-p",
                    str(port),
                    "-r",
                    str(peer_port),
                    "-e",
                    "127.0.0.1",
                    "-u",
                    "uclient-user",
                    "-W",
                    SECRET,
                    "-n",
                    str(int(seconds * 20)),
                    "-z",
                    "50",
                    "127.0.0.1",
                ],
                capture_output=True,
                timeout=seconds + 30,
            )
        finally:
            peer_proc.terminate()
            peer_proc.wait(5)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@ADMIN
async def test_cli_lists_uclient_and_kills(server: RunningServer) -> None:
    url = _base(server).removesuffix("/admin/v1")
    thread = _uclient_in_background(server.address[1], 6)
    try:
        rows: list[dict[str, Any]] = []
        for _ in range(60):
            done = await asyncio.to_thread(_admin_cli, url, "allocations", "--json")
            assert done.returncode == 0, done.stderr
            rows = [r for r in json.loads(done.stdout) if r["user"] == "uclient-user"]
            if rows and any(r["packets_to_peer"] for r in rows):
                break
            await asyncio.sleep(0.1)
        assert rows and rows[0]["client"] and rows[0]["relayed"]
        assert any(r["packets_to_peer"] > 0 for r in rows)
        table = await asyncio.to_thread(_admin_cli, url, "allocations", "--user", "uclient-user")
        assert "uclient-user" in table.stdout and "ID" in table.stdout
        killed = await asyncio.to_thread(_admin_cli, url, "end", rows[0]["id"])
        assert killed.returncode == 0
        # `kill`, the name `end` had before, still works
        unknown = await asyncio.to_thread(_admin_cli, url, "kill", "w0-doesnotexist")
        assert unknown.returncode == 1 and "404" in unknown.stderr
        bad = await asyncio.to_thread(
            run_cli, "admin", "--server", url, "--token", "wrong-token-00000000", "summary"
        )
        assert bad.returncode == 1 and "401" in bad.stderr
    finally:
        await asyncio.to_thread(thread.join, 60)


async def _try_allocate(port: int, user: str) -> tuple[TurnClient | None, int | None, int]:
    cred = mint(SECRET, user, 600, time.time())
    c = await TurnClient.connect("udp", ("127.0.0.1", port), cred.username, cred.password)
    try:
        relayed, _ = await c.allocate()
    except TurnClientError as exc:
        c.close()
        return None, exc.code, 0
    return c, 0, relayed[1]


@pytest.mark.one_loop  # the server is a subprocess: the test's loop is only its client's
async def test_revocation_across_workers_persists_and_follows_the_file(tmp_path: Path) -> None:
    admin_port = free_port(__import__("socket").SOCK_STREAM)
    revocations = tmp_path / "revocations.json"
    lo = 35000 + os.getpid() % 500
    args = [
        *loopback_args(SECRET, lo, lo + 99),
        "--probe-interval",
        "0",
        "--workers",
        "2",
        "--admin-listen",
        f"127.0.0.1:{admin_port}",
        "--admin-token",
        f"ops:{TOKEN}",
        "--revocations-file",
        str(revocations),
    ]
    url = f"http://127.0.0.1:{admin_port}"
    with turnserver_process(tmp_path, *args) as server:
        for _ in range(100):  # until both workers answer the admin fan-out
            got = await asyncio.to_thread(_admin_cli, url, "summary")
            if got.returncode == 0 and json.loads(got.stdout).get("workers") == 2:
                break
            await asyncio.sleep(0.1)
        # Three or more allocations of one user, on both workers (relay port slices)
        victims: list[TurnClient] = []
        workers: set[int] = set()
        for _ in range(12):
            c, _, port = await _try_allocate(server.port, "eve")
            assert c is not None
            victims.append(c)
            workers.add(0 if port < lo + 50 else 1)
            if len(victims) >= 3 and workers == {0, 1}:
                break
        assert workers == {0, 1}
        bystander, _, _ = await _try_allocate(server.port, "frank")
        assert bystander is not None
        listed = json.loads(
            (await asyncio.to_thread(_admin_cli, url, "allocations", "--json")).stdout
        )
        assert {r["worker"] for r in listed if r["user"] == "eve"} == {0, 1}
        done = await asyncio.to_thread(
            _admin_cli, url, "revoke", "eve", "--for", "2h", "--reason", "test"
        )
        assert done.returncode == 0, done.stderr
        assert f"{len(victims)} allocations ended" in done.stdout
        for v in victims:
            assert await _code(v.refresh(600)) == 403
            v.close()
        assert (await _try_allocate(server.port, "eve"))[1] == 403
        assert await bystander.refresh(600) == 600
        bystander.close()
        saved = json.loads(revocations.read_text())
        assert [r["user"] for r in saved["revocations"]] == ["eve"]
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(15) == 0
    with turnserver_process(tmp_path, *args) as server:
        # The revocation holds after a restart
        for _ in range(50):
            if (await _try_allocate(server.port, "eve"))[1] == 403:
                break
            await asyncio.sleep(0.1)
        for _ in range(4):  # whichever worker answers
            assert (await _try_allocate(server.port, "eve"))[1] == 403
        # Edit the file and SIGHUP: eve is allowed again, mallory is revoked
        revocations.write_text(
            json.dumps({"revocations": [{"user": "mallory", "until": time.time() + 600}]})
        )
        server.proc.send_signal(signal.SIGHUP)
        ok = None
        for _ in range(50):
            ok, _code_seen, _ = await _try_allocate(server.port, "eve")
            if ok is not None:
                break
            await asyncio.sleep(0.1)
        assert ok is not None
        ok.close()
        for _ in range(4):
            assert (await _try_allocate(server.port, "mallory"))[1] == 403
        assert "Traceback" not in server.log()


def test_core_revocations_expire_and_kill_by_id() -> None:
    from tests.support.core_client import CoreClient, error_code, make_core

    core, _ = make_core()
    a = CoreClient(core, client=("192.0.2.1", 1))
    assert a.allocate().message_class == 2
    alloc = next(iter(core.allocations.values()))
    assert alloc.id.startswith("w0-")
    assert core.end_allocation(alloc.id, "admin", a.now)
    assert not core.allocations and not core.allocations_by_id
    assert core.revoke("alice", a.now + 10, "test", a.now) == 0
    b = CoreClient(core, client=("192.0.2.1", 2))
    assert error_code(b.allocate()) == 403
    b.now += 11  # the revocation ended: forgotten and allowed again
    b.nonce = None
    assert b.allocate().message_class == 2
    assert "alice" not in core.revocations
