"""The fleet's rules without Redis (ops/fleet/node.py): which nodes a caller gets, in which
order; the caller's region; records that are not ours; how a node applies the fleet's
revocations (lifted only when lifted explicitly); the fleet.* configuration keys."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict
from typing import Any

import pytest

from tests.support.core_client import NOW, CoreClient, error_code, make_core
from turnserver.core import events as ev
from turnserver.core.fleet_leases import FleetLeases
from turnserver.ops.config.settings import parse_yaml
from turnserver.ops.config.values import ConfigError
from turnserver.ops.fleet.node import FleetConfig, FleetNode
from turnserver.ops.fleet.registry import NodeRecord, fleet_table
from turnserver.ops.http.admin_api import AdminApi, Filters
from turnserver.ops.http.credentials import ServerUris
from turnserver.ops.http.revocations import RevocationStore
from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_message


def _record(name: str, region: str, allocations: int, **kw: Any) -> NodeRecord:
    values: dict[str, Any] = {
        "id": name,
        "region": region,
        "zone": "",
        "stun": [f"stun:{name}:3478"],
        "turn": [f"turn:{name}:3478?transport=udp"],
        "ready": True,
        "draining": False,
        "allocations": allocations,
        "relay_ports_free": 100,
        "updated": time.time(),
    }
    values.update(kw)
    return NodeRecord(**values)


async def _ready() -> bool:
    return True


async def _summary() -> dict[str, Any]:
    return {}


def _node(**config: Any) -> FleetNode:
    own = ServerUris(("stun:self:3478",), ("turn:self:3478?transport=udp",))
    node = FleetNode(
        FleetConfig(redis="redis://127.0.0.1:1/0", node="self", **config),
        lambda: own,
        _ready,
        _summary,
        None,
    )
    node.connected = True
    node.snapshot_at = time.monotonic()
    return node


def test_healthy_nodes_region_first_then_least_loaded_and_bounded() -> None:
    node = _node(max_servers=3)
    node.nodes = {
        r.id: r
        for r in (
            _record("eu-busy", "eu", 50),
            _record("eu-idle", "eu", 1),
            _record("us-1", "us", 0),
            _record("us-2", "us", 7),
            _record("draining", "us", 0, draining=True),
            _record("not-ready", "us", 0, ready=False),
        )
    }
    uris = node.uris_for("eu")
    assert [u.split(":")[1] for u in uris.turn] == ["eu-idle", "eu-busy", "us-1"]
    assert [u.split(":")[1] for u in node.uris_for("us").turn] == ["us-1", "us-2", "eu-idle"]
    assert [u.split(":")[1] for u in node.uris_for(None).turn] == ["us-1", "eu-idle", "us-2"]


def test_a_stale_snapshot_or_no_healthy_node_hands_out_this_node_alone() -> None:
    node = _node()
    node.nodes = {"other": _record("other", "eu", 0)}
    node.snapshot_at = time.monotonic() - 10  # Redis away for longer than the TTL
    assert node.uris_for("eu").turn == ("turn:self:3478?transport=udp",)
    node.snapshot_at = time.monotonic()
    node.connected = False
    assert node.uris_for("eu").turn == ("turn:self:3478?transport=udp",)
    node.set_draining()
    assert node.uris_for("eu") == ServerUris((), ())  # never itself while draining


def test_the_callers_region_header_then_networks_then_this_nodes() -> None:
    from turnserver.core.policy import parse_networks

    node = _node(
        region="eu",
        region_header="X-Region",
        regions=(("us", parse_networks(["198.51.100.0/24"])),),
    )
    assert node.region_of({"X-Region": "ap"}, "198.51.100.7") == "ap"
    assert node.region_of({"X-Region": "x" * 65}, "198.51.100.7") == "us"  # too long
    assert node.region_of({}, "198.51.100.7") == "us"
    assert node.region_of({}, "203.0.113.1") == "eu"
    assert node.region_of({}, "not-an-address") == "eu"


def test_records_that_are_not_ours_are_ignored_and_the_table_reads() -> None:
    assert NodeRecord.parse("not json") is None
    assert NodeRecord.parse(json.dumps({"region": "eu"})) is None  # no id
    good = _record("a", "eu", 3)
    assert NodeRecord.parse(json.dumps(asdict(good))) == good
    lines = fleet_table({"a": good, "b": _record("b", "us", 0, draining=True)}, time.time())
    assert lines[0].split()[:4] == ["NODE", "REGION", "ZONE", "STATE"]
    assert "healthy" in lines[1] and "draining" in lines[2]


class _Backend:
    def __init__(self) -> None:
        self.revoked: dict[str, float] = {}
        self.ended = 0

    async def allocations(self, filters: Filters, limit: int, cursor: str) -> list[Any]:
        return []

    async def allocation(self, allocation_id: str) -> dict[str, Any] | None:
        return None

    async def end(self, allocation_id: str) -> bool:
        return False

    async def revoke(self, user: str, until: float, reason: str) -> int:
        self.revoked[user] = until
        return 2

    async def unrevoke(self, user: str) -> bool:
        return self.revoked.pop(user, None) is not None

    async def summary(self) -> dict[str, Any]:
        return {}


def test_a_node_applies_the_fleets_revocations_and_lifts_only_explicit_lifts(
    tmp_path: Any,
) -> None:
    until = time.time() + 3600
    store = RevocationStore(str(tmp_path / "revocations.json"))
    backend = _Backend()
    api = AdminApi(backend, [], store)
    api.apply_file({"filed": (until, "in our file")})
    published: list[tuple[str, float | None]] = []
    api.publish = lambda user, when, reason: published.append((user, when))

    async def run() -> None:
        ended = await api.apply_fleet({"remote": (until, "made elsewhere")}, set())
        assert ended == 2 and set(backend.revoked) == {"remote"}
        # gone from the fleet's set (a Redis that restarted empty is given every node's
        # revocations before any node reads it: FleetNode._republish): "remote" goes,
        # our own file's entry stays without an explicit lift
        await api.apply_fleet({}, set())
        assert "remote" not in backend.revoked and "filed" in api.revocations
        # lifted explicitly on another node: gone from our file too
        await api.apply_fleet({}, {"filed"})
        assert "filed" not in api.revocations
        assert "filed" not in store.load(time.time())

    asyncio.run(run())
    assert published == []  # applying the fleet's changes publishes nothing back
    api.apply_file({"new": (until, "")})  # an edit of our file goes out
    assert published == [("new", until)]


def test_fleet_keys_are_checked_and_named() -> None:
    values = parse_yaml(
        "fleet:\n  redis: rediss://user:pw@redis:6380/1\n  region: eu-west\n"
        "  regions: {us: [198.51.100.0/24]}\n  heartbeat: 0.5\n"
    )
    assert values["fleet_redis"].startswith("rediss://")
    assert values["fleet_regions"] == (("us", ("198.51.100.0/24",)),)
    for text, key in (
        ("fleet:\n  redis: http://x\n", "fleet.redis"),
        ("fleet:\n  region: 'e u'\n", "fleet.region"),
        ("fleet:\n  regions: {us: [nonsense]}\n", "fleet.regions.us"),
        ("fleet:\n  regions: [a]\n", "fleet.regions"),
        ("fleet:\n  heartbeat: 0\n", "fleet.heartbeat"),
    ):
        with pytest.raises(ConfigError, match=key):
            parse_yaml(text)


# ---- the fleet's per-user quota in the core (core/fleet_leases.py) ------------------------


def _deferred_allocate(core: Any, client: Any) -> bytes:
    """An authenticated Allocate the core defers for a lease: its bytes."""
    first = client.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)], auth=False)
    assert error_code(first) == 401
    client.nonce = first.get(Attr.NONCE)
    data = encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        os.urandom(12),
        [
            (Attr.REQUESTED_TRANSPORT, 17),
            (Attr.USERNAME, client.username),
            (Attr.REALM, client.realm),
            (Attr.NONCE, client.nonce),
        ],
        integrity_key=client.key,
    )
    assert core.handle_message(data, client.ft, NOW) is None  # no answer yet
    return data


def test_an_allocate_waits_for_its_lease_and_gives_it_back_when_it_ends() -> None:
    core, _ = make_core()
    core.fleet_leases = FleetLeases(2)
    c = CoreClient(core)
    data = _deferred_allocate(core, c)
    [asked] = [e for e in core.drain_events() if isinstance(e, ev.FleetLeaseNeeded)]
    assert (asked.user, asked.message, asked.five_tuple) == ("alice", data, c.ft)
    # a retransmission while the lease is asked for: dropped, not asked again
    assert core.handle_message(data, c.ft, NOW) is None
    assert not [e for e in core.drain_events() if isinstance(e, ev.FleetLeaseNeeded)]
    out = core.fleet_lease_result(c.ft, asked.transaction_id, "alice", data, True, NOW)
    assert decode_message(out).message_class == MessageClass.SUCCESS
    assert core.allocations[c.ft].fleet_lease
    assert not core.fleet_leases.pending and not core.fleet_leases.granted
    # a retransmission after the answer: the same response, no second lease
    assert core.handle_message(data, c.ft, NOW) == out
    core.drain_events()
    assert c.request(Method.REFRESH, [(Attr.LIFETIME, 0)]).get(Attr.LIFETIME) == 0
    released = [e for e in core.drain_events() if isinstance(e, ev.FleetLeaseReleased)]
    assert [e.user for e in released] == ["alice"]


def test_a_refused_lease_is_486_and_an_untaken_one_goes_back() -> None:
    core, opener = make_core()
    core.fleet_leases = FleetLeases(2)
    c = CoreClient(core)
    data = _deferred_allocate(core, c)
    tid = decode_message(data).transaction_id
    out = core.fleet_lease_result(c.ft, tid, "alice", data, False, NOW)
    assert error_code(decode_message(out)) == 486
    refused = [e for e in core.drain_events() if isinstance(e, ev.AllocationRefused)]
    assert refused[-1].reason == "quota_fleet_user"
    assert not core.allocations and not core.fleet_leases.refused
    # a lease granted for a request the core no longer waits on is given back at once
    assert core.fleet_lease_result(c.ft, tid, "alice", data, True, NOW) is None
    released = [e for e in core.drain_events() if isinstance(e, ev.FleetLeaseReleased)]
    assert [e.user for e in released] == ["alice"]
    # granted, but the Allocate fails after all (no relay port): given back too
    opener.busy = set(range(50000, 50100))
    d = CoreClient(core, ("192.0.2.60", 1))
    data = _deferred_allocate(core, d)
    tid = decode_message(data).transaction_id
    out = core.fleet_lease_result(d.ft, tid, "alice", data, True, NOW)
    assert error_code(decode_message(out)) == 508
    released = [e for e in core.drain_events() if isinstance(e, ev.FleetLeaseReleased)]
    assert [e.user for e in released] == ["alice"]


def test_a_core_without_the_fleet_quota_never_waits() -> None:
    core, _ = make_core()
    assert CoreClient(core).allocate().message_class == MessageClass.SUCCESS
    assert not any(isinstance(e, ev.FleetLeaseNeeded) for e in core.drain_events())


def test_sentinel_urls_are_read_or_refused_by_name() -> None:
    from turnserver.ops.config.values import check_redis_url, parse_sentinel_url

    assert parse_sentinel_url("redis+sentinel://a:26380,[::1],b/turn/2") == (
        [("a", 26380), ("::1", 26379), ("b", 26379)],
        "turn",
        2,
    )
    for bad, words in (
        ("redis+sentinel://a:26379", "no service name"),
        ("redis+sentinel://a:port/turn", "is not HOST:PORT"),
        ("redis+sentinel://a/turn/x", "is not a number"),
        ("sentinel://a/turn", "is not a Redis URL"),
    ):
        with pytest.raises(ConfigError, match=words):
            check_redis_url(bad, "fleet.redis")
