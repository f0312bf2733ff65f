"""The fleet's registry of nodes (ops/fleet/node.py writes it): the fleet: section, a node's
record, reading them all, this node's turn_fleet_* series, and `turnserver fleet` (a
table or JSON)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from turnserver.core.policy import IPNetwork, parse_networks
from turnserver.ops.config.values import SENTINEL_SCHEME, parse_sentinel_url

if TYPE_CHECKING:
    from turnserver.ops.config.settings import Settings


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The `fleet:` section."""

    redis: str
    node: str
    password: str | None = None
    region: str = ""
    zone: str = ""
    prefix: str = "turnserver:"
    heartbeat: float = 1.0
    required: bool = False
    max_servers: int = 3
    region_header: str = ""
    regions: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = ()
    max_allocations_per_user: int = 0
    admin_url: str = ""

    @property
    def ttl(self) -> float:
        """A node that misses this long of heartbeats leaves the registry."""
        return 3 * self.heartbeat

    @classmethod
    def from_settings(cls, s: Settings) -> FleetConfig | None:
        from turnserver.ops.config.settings import fleet_admin_url

        if not s.fleet_redis:
            return None
        return cls(
            redis=s.fleet_redis,
            node=s.fleet_node or socket.gethostname(),
            password=s.fleet_redis_password,
            region=s.fleet_region,
            zone=s.fleet_zone,
            prefix=s.fleet_prefix,
            heartbeat=s.fleet_heartbeat,
            required=s.fleet_required,
            max_servers=s.fleet_max_servers,
            region_header=s.fleet_region_header,
            regions=tuple((name, parse_networks(list(cidrs))) for name, cidrs in s.fleet_regions),
            max_allocations_per_user=s.fleet_max_allocations_per_user,
            admin_url=fleet_admin_url(s),
        )


class FleetState(Protocol):
    """What the metrics read of this node's membership (ops/fleet/node.py FleetNode)."""

    connected: bool
    errors: int
    nodes: dict[str, NodeRecord]


@dataclass(slots=True)
class NodeRecord:
    """What a node publishes about itself each heartbeat."""

    id: str
    region: str
    zone: str
    stun: list[str]
    turn: list[str]
    ready: bool
    draining: bool
    allocations: int
    relay_ports_free: int
    updated: float
    started: float = 0.0
    pid: int = 0
    admin: str = ""  # its admin API's base URL, for fan-out ("": not reachable)

    @classmethod
    def parse(cls, text: str) -> NodeRecord | None:
        """A record read from Redis, or None if it is not one of ours."""
        try:
            data = json.loads(text)
            return cls(
                id=str(data["id"]),
                region=str(data.get("region", "")),
                zone=str(data.get("zone", "")),
                stun=[str(u) for u in data.get("stun", [])],
                turn=[str(u) for u in data.get("turn", [])],
                ready=bool(data.get("ready")),
                draining=bool(data.get("draining")),
                allocations=int(data.get("allocations", 0)),
                relay_ports_free=int(data.get("relay_ports_free", 0)),
                updated=float(data.get("updated", 0)),
                started=float(data.get("started", 0)),
                pid=int(data.get("pid", 0)),
                admin=str(data.get("admin", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def healthy(self) -> bool:
        return self.ready and not self.draining


def redis_client(url: str, password: str | None = None) -> Any:
    """The asyncio client for fleet.redis (redis://, rediss://, unix://, or
    redis+sentinel://HOST:PORT,HOST:PORT/SERVICE[/DB]: the master Sentinel names, followed
    through failovers by the client library); short timeouts so that a Redis that went
    away costs a heartbeat, never a stalled loop."""
    import redis.asyncio as aioredis

    kwargs: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 2,
        "socket_timeout": 2,
        "health_check_interval": 10,
    }
    if password is not None:
        kwargs["password"] = password
    if url.startswith(SENTINEL_SCHEME):
        from redis.asyncio.sentinel import Sentinel

        sentinels, service, db = parse_sentinel_url(url)
        sentinel = Sentinel(sentinels, socket_connect_timeout=2, socket_timeout=2)
        return sentinel.master_for(service, db=db, **kwargs)
    return aioredis.from_url(url, **kwargs)


async def read_registry(client: Any, prefix: str) -> dict[str, NodeRecord]:
    """Every live node record under `prefix`."""
    keys = [k async for k in client.scan_iter(match=f"{prefix}node:*", count=200)]
    if not keys:
        return {}
    out: dict[str, NodeRecord] = {}
    for value in await client.mget(keys):
        record = NodeRecord.parse(value) if value else None
        if record is not None:
            out[record.id] = record
    return out


class FleetCollector(Collector):
    """turn_fleet_*: the Redis connection and the registry as this node sees it."""

    def __init__(self, node: FleetState) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield GaugeMetricFamily(
            "turn_fleet_redis_connected",
            "1 while this node reaches the fleet's Redis",
            value=1 if node.connected else 0,
        )
        yield CounterMetricFamily(
            "turn_fleet_redis_errors",
            "Failed Redis operations (heartbeat, revocation sync)",
            value=node.errors,
        )
        nodes = GaugeMetricFamily(
            "turn_fleet_nodes", "Nodes in the registry, by state", labels=["state"]
        )
        snapshot = list(node.nodes.values()) if node.connected else []
        healthy = sum(1 for n in snapshot if n.healthy)
        draining = sum(1 for n in snapshot if n.draining)
        nodes.add_metric(["healthy"], healthy)
        nodes.add_metric(["draining"], draining)
        nodes.add_metric(["not_ready"], len(snapshot) - healthy - draining)
        yield nodes


def fleet_table(nodes: dict[str, NodeRecord], now: float) -> list[str]:
    """`turnserver fleet` lines."""
    header = ("NODE", "REGION", "ZONE", "STATE", "ALLOCATIONS", "FREE PORTS", "AGE", "TURN URIS")
    rows = [header]
    for n in sorted(nodes.values(), key=lambda n: (n.region, n.id)):
        state = "draining" if n.draining else ("healthy" if n.ready else "not ready")
        rows.append(
            (
                n.id,
                n.region or "-",
                n.zone or "-",
                state,
                str(n.allocations),
                str(n.relay_ports_free),
                f"{max(0.0, now - n.updated):.1f}s",
                " ".join(n.turn) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    ]


def fleet_command(args: Any) -> int:
    """`turnserver fleet [--redis URL | --config FILE] [--json]`."""
    import sys

    from turnserver.ops.config.settings import read_settings
    from turnserver.ops.config.values import ConfigError, check_redis_url

    try:
        settings = read_settings(args.config, {}) if args.config else None
        url = check_redis_url(args.redis, "--redis") if args.redis else None
    except ConfigError as exc:
        print(f"turnserver fleet: {exc}", file=sys.stderr)
        return 2
    url = url or (settings.fleet_redis if settings else None)
    if not url:
        print(
            "turnserver fleet: give --redis URL or --config FILE with fleet.redis", file=sys.stderr
        )
        return 2
    prefix = args.prefix or (settings.fleet_prefix if settings else "turnserver:")
    password = settings.fleet_redis_password if settings else None
    from redis.exceptions import RedisError

    try:
        nodes = asyncio.run(_read(url, prefix, password))
    except (RedisError, OSError) as exc:
        print(f"turnserver fleet: Redis at {url.split('@')[-1]}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"nodes": [asdict(n) for n in nodes.values()]}, indent=2))
    else:
        print("\n".join(fleet_table(nodes, time.time())))
    return 0


async def _read(url: str, prefix: str, password: str | None) -> dict[str, NodeRecord]:
    client = redis_client(url, password)
    try:
        return await read_registry(client, prefix)
    finally:
        await client.aclose()
