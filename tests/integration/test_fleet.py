"""Several servers as one service on a real redis-server (ops/fleet/node.py): three nodes, each
a separate process with the default worker count; the registry, ICE servers of healthy
nodes only (the caller's region first), revocations that reach every node within 1 s
and end live allocations there, Redis lost and back (empty) while the nodes serve,
SIGTERM and kill -9 of a node, and a Redis that is not there at start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_until
from tests.support.procs import ServerProcess, free_port, turnserver_process
from tests.support.server import require_tool
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.ops.http.credentials import mint

SECRET = "fleet-secret"
API_KEY = "fleet-api-key"
TOKEN = "fleet-admin-token-0123456789"
HEARTBEAT = 0.5  # fleet.heartbeat: a node is gone 3 heartbeats after its last
FLEET_QUOTA = 2  # fleet.max_allocations_per_user


@dataclass
class Node:
    name: str
    region: str
    server: ServerProcess
    api: int
    admin: int
    metrics: int
    revocations: Path

    @property
    def turn_uri(self) -> str:
        return f"turn:127.0.0.1:{self.server.port}?transport=udp"


class Redis:
    """redis-server on loopback, without persistence: a restart comes back empty, the
    hardest case for the nodes (they must give it their state again)."""

    def __init__(self, tmp: Path) -> None:
        self.binary = require_tool("redis-server", "redis-server")
        self.port = free_port(socket.SOCK_STREAM)
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, extra: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
                *(extra or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self.ping, 10, "redis-server answers PING")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def ice_turn_uris(node: Node, region: str | None = None) -> list[str]:
    headers = {"X-API-Key": API_KEY, **({"X-Region": region} if region else {})}
    status, body = http(
        "GET", f"http://127.0.0.1:{node.api}/api/v1/ice-servers?username=u", headers=headers
    )
    assert status == 200, status
    return [u for s in body["iceServers"] if "username" in s for u in s["urls"]]


def admin(node: Node, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{node.admin}/admin/v1{path}"
    status, answer = http(method, url, body, {"Authorization": f"Bearer {TOKEN}"})
    return int(status), answer


def metric(node: Node, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


def readyz(node: Node) -> int:
    status, _ = http("GET", f"http://127.0.0.1:{node.metrics}/readyz")
    return int(status)


async def _allocate(node: Node, user: str) -> TurnClient:
    cred = mint(SECRET, user, 600, time.time())
    c = await TurnClient.connect(
        "udp", ("127.0.0.1", node.server.port), cred.username, cred.password, timeout=2
    )
    try:
        await c.allocate()
    except BaseException:
        c.close()
        raise
    return c


def refused_code(node: Node, user: str) -> int | None:
    """Allocate as `user` on `node` (and end it): None if it succeeds, else the code."""

    async def attempt() -> int | None:
        try:
            c = await _allocate(node, user)
        except TurnClientError as exc:
            return exc.code
        try:
            await c.refresh(0)
        except TurnClientError:
            pass  # revoked since: it ended the allocation
        c.close()
        return None

    return asyncio.run(attempt())


def fleet_cli(redis: Redis, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turnserver", "fleet", "--redis", redis.url, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def registry(redis: Redis) -> dict[str, dict[str, Any]]:
    done = fleet_cli(redis, "--json")
    assert done.returncode == 0, done.stderr
    return {n["id"]: n for n in json.loads(done.stdout)["nodes"]}


def _config(tmp: Path, name: str, region: str, redis: Redis, ports: dict[str, int]) -> Path:
    lo = 30000 + (os.getpid() % 20) * 300 + ports["index"] * 100
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"""realm: example.org
auth:
  secrets: [{SECRET}]
relay:
  ip: [127.0.0.1]
  min_port: {lo}
  max_port: {lo + 99}
peers:
  allow_loopback: true
api:
  listen: 127.0.0.1:{ports["api"]}
  keys: [{API_KEY}]
  rate_per_second: 1000
  rate_burst: 1000
admin:
  listen: 127.0.0.1:{ports["admin"]}
  tokens: ["ops:{TOKEN}"]
  revocations_file: {tmp / f"{name}-revocations.json"}
probe:
  interval: 5
fleet:
  redis: {redis.url}
  node: {name}
  region: {region}
  heartbeat: {HEARTBEAT}
  region_header: X-Region
  max_allocations_per_user: {FLEET_QUOTA}
log:
  level: info
"""
    )
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Redis, dict[str, Node]]]:
    tmp = tmp_path_factory.mktemp("fleet")
    redis = Redis(tmp)
    redis.start()
    nodes: dict[str, Node] = {}
    try:
        with ExitStack() as stack:
            for i, (name, region) in enumerate((("A", "eu"), ("B", "eu"), ("C", "us"))):
                ports = {
                    "index": i,
                    "api": free_port(socket.SOCK_STREAM),
                    "admin": free_port(socket.SOCK_STREAM),
                }
                metrics = free_port(socket.SOCK_STREAM)
                config = _config(tmp, name, region, redis, ports)
                server = stack.enter_context(
                    turnserver_process(
                        tmp, "--config", str(config), workers=None, metrics=f"127.0.0.1:{metrics}"
                    )
                )
                nodes[name] = Node(
                    name, region, server, ports["api"], ports["admin"], metrics,
                    tmp / f"{name}-revocations.json",
                )  # fmt: skip
            wait_until(
                lambda: (
                    all(n.get("ready") for n in registry(redis).values())
                    and len(registry(redis)) == 3
                ),
                30,
                "three healthy nodes in the registry",
            )
            yield redis, nodes
    finally:
        redis.stop()


def test_registry_and_ice_servers_of_healthy_nodes_region_first(
    fleet: tuple[Redis, dict[str, Node]],
) -> None:
    redis, nodes = fleet
    table = fleet_cli(redis)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NODE", "REGION", "ZONE", "STATE"]
    assert sorted(ln.split()[0] for ln in lines[1:]) == ["A", "B", "C"]
    assert all(" healthy " in ln for ln in lines[1:])
    record = registry(redis)["C"]
    assert record["region"] == "us" and nodes["C"].turn_uri in record["turn"]
    # any node hands out every healthy node; the caller's region first
    for asked in nodes.values():
        uris = ice_turn_uris(asked, "us")
        assert uris[0] == nodes["C"].turn_uri
        assert {n.turn_uri for n in nodes.values()} <= set(uris)
    # no region given: the asked node's own region first
    assert ice_turn_uris(nodes["C"])[0] == nodes["C"].turn_uri
    assert ice_turn_uris(nodes["A"])[0] in (nodes["A"].turn_uri, nodes["B"].turn_uri)
    # the TURN REST endpoint and the Tokens API answer the same servers
    status, body = http(
        "GET",
        f"http://127.0.0.1:{nodes['B'].api}/api/v1/turn-credentials?username=u",
        headers={"X-API-Key": API_KEY, "X-Region": "us"},
    )
    assert status == 200 and body["uris"][0] == nodes["C"].turn_uri
    assert metric(nodes["A"], "turn_fleet_redis_connected") == 1


def test_a_revocation_reaches_every_node_within_a_second(
    fleet: tuple[Redis, dict[str, Node]],
) -> None:
    _, nodes = fleet
    runner = asyncio.Runner()  # the live client's loop, open until it is closed
    live = runner.run(_allocate(nodes["C"], "mallory"))
    try:
        assert refused_code(nodes["B"], "mallory") is None
        start = time.monotonic()
        status, _ = admin(nodes["A"], "POST", "/revocations", {"user": "mallory", "for": "1h"})
        assert status == 201
        wait_until(lambda: refused_code(nodes["B"], "mallory") == 403, 1.0, "B refuses mallory")
        took = time.monotonic() - start
        # C ended mallory's live allocation
        wait_until(
            lambda: admin(nodes["C"], "GET", "/allocations?user=mallory")[1]["allocations"] == [],
            1.0,
            "C ends mallory's allocation",
        )
        assert took < 1.0
        status, listed = admin(nodes["C"], "GET", "/revocations")
        assert status == 200 and [r["user"] for r in listed["revocations"]] == ["mallory"]
        # lifted on another node: allowed everywhere again
        assert admin(nodes["B"], "DELETE", "/revocations/mallory")[0] == 200
        wait_until(lambda: refused_code(nodes["A"], "mallory") is None, 1.0, "A allows again")
        wait_until(lambda: refused_code(nodes["C"], "mallory") is None, 1.0, "C allows again")
    finally:
        live.close()
        runner.close()
    # the revocations file of one node is a revocation of the fleet
    until = int(time.time()) + 3600
    nodes["C"].revocations.write_text(
        json.dumps({"revocations": [{"user": "oscar", "until": until, "reason": "file"}]})
    )
    wait_until(lambda: refused_code(nodes["A"], "oscar") == 403, 5.0, "A refuses oscar")


async def _hold(nodes: list[Node], user: str) -> tuple[list[TurnClient], list[int]]:
    """One Allocate as `user` on each of `nodes`, all at once: the clients that got an
    allocation (left open) and the codes of those refused."""

    async def one(node: Node) -> TurnClient | int:
        try:
            return await _allocate(node, user)
        except TurnClientError as exc:
            return exc.code

    got = await asyncio.gather(*(one(n) for n in nodes))
    return [c for c in got if isinstance(c, TurnClient)], [c for c in got if isinstance(c, int)]


async def _release(clients: list[TurnClient]) -> None:
    for c in clients:
        await c.refresh(0)
        c.close()


def test_a_per_user_quota_holds_across_the_fleet(fleet: tuple[Redis, dict[str, Node]]) -> None:
    """fleet.max_allocations_per_user 2: 50 concurrent Allocates of one user spread over
    three nodes (each with the default worker count) get exactly 2 allocations, the rest
    486; other users are not affected; released, the user may allocate again."""
    _, nodes = fleet
    spread = [list(nodes.values())[i % 3] for i in range(50)]

    async def scenario() -> None:
        held, refused = await _hold(spread, "quota-user")
        try:
            assert len(held) == FLEET_QUOTA, (len(held), refused)
            assert refused == [486] * (50 - FLEET_QUOTA)
            other, none = await _hold(list(nodes.values())[:2], "someone-else")
            assert len(other) == 2 and none == []
            await _release(other)
        finally:
            await _release(held)
        again, refused = await _hold(list(nodes.values())[1:], "quota-user")
        assert len(again) == 2 and refused == []
        await _release(again)

    asyncio.run(scenario())
    leases = sum(
        metric(n, 'turn_fleet_quota_leases_total{result="granted"}') or 0 for n in nodes.values()
    )
    assert leases >= FLEET_QUOTA + 2 + 2


def admin_cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    server = f"http://127.0.0.1:{node.admin}"
    return subprocess.run(
        [sys.executable, "-m", "turnserver", "admin", "--server", server, "--token", TOKEN, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_admin_on_any_node_lists_and_ends_every_nodes_allocations(
    fleet: tuple[Redis, dict[str, Node]],
) -> None:
    """`turnserver admin allocations --fleet` against A lists B's and C's allocations (ids
    that name their node); `kill` of C's through A ends it on C; B's stays."""
    _, nodes = fleet
    a, b, c = nodes["A"], nodes["B"], nodes["C"]
    runner = asyncio.Runner()
    held = [runner.run(_allocate(b, "fan")), runner.run(_allocate(c, "fan"))]
    try:
        status, body = admin(a, "GET", "/allocations?fleet=1&user=fan")
        assert status == 200 and body["unreachable"] == [], body
        assert sorted(x["node"] for x in body["allocations"]) == ["B", "C"]
        listed = admin_cli(a, "allocations", "--fleet", "--user", "fan", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {r["node"]: r for r in json.loads(listed.stdout)}
        assert set(rows) == {"B", "C"} and rows["C"]["id"].startswith("C~")
        killed = admin_cli(a, "end", rows["C"]["id"])
        assert killed.returncode == 0, killed.stderr
        wait_until(
            lambda: admin(c, "GET", "/allocations?user=fan")[1]["allocations"] == [],
            2.0,
            "C ended fan's allocation",
        )
        status, one = admin(a, "GET", f"/allocations/{rows['B']['id']}")
        assert status == 200 and one["user"] == "fan"
        assert admin(a, "GET", "/allocations/nowhere~w0-1")[0] == 404
    finally:
        runner.run(_release(held[:1]))
        for client in held:
            client.close()
        runner.close()


def test_redis_lost_and_back_empty_reconverges(fleet: tuple[Redis, dict[str, Node]]) -> None:
    redis, nodes = fleet
    assert admin(nodes["A"], "POST", "/revocations", {"user": "trudy", "for": "1h"})[0] == 201
    wait_until(lambda: refused_code(nodes["C"], "trudy") == 403, 1.0, "C refuses trudy")
    redis.stop()
    wait_until(
        lambda: metric(nodes["B"], "turn_fleet_redis_connected") == 0, 10, "B sees Redis gone"
    )
    # serving on: ready, the revocations it knows, credentials naming itself
    assert readyz(nodes["B"]) == 200
    assert refused_code(nodes["B"], "trudy") == 403
    assert ice_turn_uris(nodes["B"]) == [nodes["B"].turn_uri]
    assert refused_code(nodes["B"], "walter") is None
    # made while Redis is away: kept, and given to the fleet when it is back
    assert admin(nodes["B"], "POST", "/revocations", {"user": "walter", "for": "1h"})[0] == 201
    assert "Redis" in nodes["B"].server.log()
    # the fleet quota held by B's own count meanwhile, and given to Redis when it is back
    runner = asyncio.Runner()
    held, refused = runner.run(_hold([nodes["B"]] * 3, "ursula"))
    assert len(held) == FLEET_QUOTA and refused == [486]
    redis.start()  # empty: no persistence
    wait_until(lambda: len(registry(redis)) == 3, 15, "every node registered again")
    try:
        wait_until(lambda: refused_code(nodes["A"], "ursula") == 486, 5, "A counts B's ursula")
        # decided by B alone: walter's allocation above and ursula's two; her third refused
        local = metric(nodes["B"], 'turn_fleet_quota_leases_total{result="local_granted"}')
        assert local == 1 + FLEET_QUOTA
        assert metric(nodes["B"], 'turn_fleet_quota_leases_total{result="local_refused"}') == 1
    finally:
        runner.run(_release(held))
        runner.close()
    wait_until(lambda: refused_code(nodes["A"], "ursula") is None, 5, "ursula released")
    wait_until(lambda: refused_code(nodes["C"], "walter") == 403, 10, "C refuses walter")
    assert refused_code(nodes["A"], "trudy") == 403  # given back by the nodes that knew it
    wait_until(lambda: metric(nodes["A"], "turn_fleet_redis_connected") == 1, 10, "A reconnected")
    assert metric(nodes["A"], "turn_fleet_redis_errors_total") not in (None, 0.0)
    every = {n.turn_uri for n in nodes.values()}
    for node in nodes.values():  # each node's own view of the registry is whole again
        wait_until(lambda n=node: every <= set(ice_turn_uris(n)), 5, f"{node.name} sees all")


def test_sigterm_leaves_at_once_and_kill_leaves_within_the_ttl(
    fleet: tuple[Redis, dict[str, Node]],
) -> None:
    redis, nodes = fleet
    a, b, c = nodes["A"], nodes["B"], nodes["C"]
    assert b.turn_uri in ice_turn_uris(a)
    runner = asyncio.Runner()
    live = runner.run(_allocate(b, "alice"))  # B drains it, up to drain.timeout
    try:
        start = time.monotonic()
        b.server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: b.turn_uri not in ice_turn_uris(a), 1.0, "B out of A's servers")
        assert time.monotonic() - start < 1.0
        assert b.server.proc.poll() is None  # still serving its live allocation
        assert registry(redis)["B"]["draining"] is True
    finally:
        live.close()
        runner.close()
    # kill -9: no goodbye; gone once its record expires (3 heartbeats), and the fleet
    # quota leases of its allocations with it
    assert c.turn_uri in ice_turn_uris(a)
    runner = asyncio.Runner()
    held, _ = runner.run(_hold([c, c], "victor"))
    assert len(held) == FLEET_QUOTA and refused_code(a, "victor") == 486
    start = time.monotonic()
    os.killpg(c.server.proc.pid, signal.SIGKILL)
    try:
        wait_until(lambda: c.turn_uri not in ice_turn_uris(a), 3 * HEARTBEAT + 2, "C gone")
        gone_after = time.monotonic() - start
        wait_until(lambda: refused_code(a, "victor") is None, 3 * HEARTBEAT + 2, "leases freed")
        freed_after = time.monotonic() - start
    finally:
        for client in held:
            client.close()
        runner.close()
    assert gone_after < 3 * HEARTBEAT + 1.5, gone_after
    assert freed_after < 3 * HEARTBEAT + 1.5, freed_after
    assert "C" not in registry(redis)
    assert ice_turn_uris(a, "us")[0] == a.turn_uri  # no us node left: the rest, by load


def test_redis_unreachable_at_start(tmp_path: Path) -> None:
    closed = free_port(socket.SOCK_STREAM)
    base = [
        "--secret", SECRET, "--relay-ip", "127.0.0.1", "--probe-interval", "0",
        "--fleet-redis", f"redis://127.0.0.1:{closed}/0", "--fleet-node", "lonely",
    ]  # fmt: skip
    with turnserver_process(tmp_path, *base, workers=None) as server:
        wait_until(lambda: "unreachable" in server.log(), 10, "the warning is logged")
        assert "serving alone" in server.log()
    required = tmp_path / "required.yaml"
    required.write_text(f"fleet:\n  redis: redis://127.0.0.1:{closed}/0\n  required: true\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "turnserver",
            "serve",
            "--config",
            str(required),
            *base[:4],
            "--listen",
            f"udp://127.0.0.1:{free_port()}",
            "--metrics-listen",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "fleet.redis" in done.stderr


def test_a_node_follows_redis_sentinel_through_a_failover(tmp_path: Path) -> None:
    """fleet.redis redis+sentinel://: the node registers in the master Sentinel names,
    and after the master is killed and Sentinel promotes the replica, in the new one."""
    (tmp_path / "replica").mkdir()
    master, replica = Redis(tmp_path), Redis(tmp_path / "replica")
    master.start()
    replica.start(["--replicaof", "127.0.0.1", str(master.port)])
    sentinel_port = free_port(socket.SOCK_STREAM)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor fleet 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds fleet 1000\nsentinel failover-timeout fleet 5000\n"
    )
    sentinel = subprocess.Popen(
        [master.binary, str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    args = [
        "--secret", SECRET, "--relay-ip", "127.0.0.1", "--probe-interval", "0",
        "--fleet-redis", f"redis+sentinel://127.0.0.1:{sentinel_port}/fleet",
        "--fleet-node", "S",
    ]  # fmt: skip
    try:
        wait_until(lambda: replica_synced(replica), 15, "the replica follows the master")
        with turnserver_process(tmp_path, *args, workers=None) as server:
            wait_until(lambda: "S" in registry(master), 15, "S registered in the master")
            master.stop()  # Sentinel promotes the replica
            wait_until(lambda: "S" in registry(replica), 30, "S registered in the new master")
            assert "Traceback" not in server.log()
    finally:
        sentinel.terminate()
        sentinel.wait(10)
        replica.stop()
        master.stop()


def replica_synced(redis: Redis) -> bool:
    with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as s:
        s.sendall(b"INFO replication\r\n")
        time.sleep(0.05)
        return b"master_link_status:up" in s.recv(4096)
