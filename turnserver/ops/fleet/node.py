"""Several servers as one service, with Redis as the shared state (no cluster protocol
of our own): a registry of nodes with a TTL heartbeat, credentials that name healthy
nodes (the caller's region first, then the least loaded), and revocations that reach
every node.

Keys, under `fleet.prefix` (default "turnserver:"):
  node:<id>      JSON NodeRecord, expires unless refreshed every heartbeat
  revocations    hash user -> JSON [until, reason]; expired entries are dropped on read
  lifted         hash user -> time a revocation was lifted (kept a day): only this
                 lifts a revocation a node holds in its own file; absence does not
  generation     a random id set once per Redis data set: a node that finds another
                 (Redis restarted empty, failed over) gives Redis what it enforces first
  revocations    channel: "changed" after every write, so nodes reconcile at once

Failure semantics (docs/scale.md "Fleet"): Redis unreachable at start is a warning and
local-only behaviour (fleet.required: refuse to start); lost while running, the node
keeps serving with the revocations it knows, hands out only itself, counts and logs
once a minute and reconnects with backoff; when Redis is back it publishes itself and
the revocations made meanwhile, then reconciles. Credentials never get weaker: a
revocation only ever adds to what a node refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prometheus_client.registry import CollectorRegistry

from turnserver.ops.fleet.quota import FleetQuota, FleetQuotaCollector
from turnserver.ops.fleet.registry import (
    FleetCollector,
    FleetConfig,
    NodeRecord,
    read_registry,
    redis_client,
)
from turnserver.ops.http.credentials import ServerUris

if TYPE_CHECKING:
    from turnserver.ops.config.settings import Settings
    from turnserver.ops.http.admin_api import AdminApi

__all__ = ["FleetConfig", "FleetNode", "join_fleet"]
log = logging.getLogger("turnserver.fleet")
LOG_INTERVAL = 60.0
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)
Revocations = dict[str, tuple[float, str]]
LIFTED_KEPT = 86400.0  # a lifted revocation's tombstone, for nodes that were away


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


class FleetNode:
    """This server's membership: heartbeat, registry snapshot, revocation sync."""

    def __init__(
        self,
        config: FleetConfig,
        own_uris: Callable[[], ServerUris],
        ready: Callable[[], Awaitable[bool]],
        summary: Callable[[], Awaitable[dict[str, Any]]],
        admin: AdminApi | None,
        quota: FleetQuota | None = None,
    ) -> None:
        from redis.exceptions import RedisError  # imported only by a fleet's node (~0.1 s)

        self._errors = (RedisError, OSError)  # OSError: refused, reset, timed out
        self.config = config
        self.own_uris = own_uris
        self.ready = ready
        self.summary = summary
        self.admin = admin
        self.redis: Any = redis_client(config.redis, config.password)
        self.quota = quota  # fleet.max_allocations_per_user (ops/fleet/quota.py)
        if quota is not None:
            quota.attach(self.redis, self._errors, self._lost, lambda: self.connected)
        self.draining = False
        self.connected = False
        self.errors = 0
        self.nodes: dict[str, NodeRecord] = {}  # the last snapshot, by id
        self.snapshot_at = 0.0
        self.started = time.time()
        self._pending: Revocations = {}  # made here while Redis was away
        self._pending_removed: set[str] = set()
        self._generation: str | None = None  # of the Redis data set we last gave it
        self._logged = -LOG_INTERVAL
        self._failed_logged = -LOG_INTERVAL
        self._slow_logged = -LOG_INTERVAL
        self._beat = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- keys -----------------------------------------------------------------------------

    def _key(self, node: str) -> str:
        return f"{self.config.prefix}node:{node}"

    @property
    def _revocations(self) -> str:
        return f"{self.config.prefix}revocations"

    @property
    def _lifted(self) -> str:
        return f"{self.config.prefix}lifted"

    @property
    def _generation_key(self) -> str:
        return f"{self.config.prefix}generation"

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Join (or warn and go on alone; raise OSError when fleet.required)."""
        try:
            await self.redis.ping()
            await self._heartbeat()
            await self._reconcile()
        except self._errors as exc:
            if self.config.required:
                raise OSError(f"fleet.redis {self._where()}: {exc}") from exc
            log.warning(
                "fleet: Redis at %s unreachable (%s); serving alone until it answers",
                self._where(),
                exc,
            )
            self._lost(exc, quiet=True)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeats()), loop.create_task(self._listen())]

    async def stop(self) -> None:
        """Leave the registry at once (a clean stop), then close."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.delete(self._key(self.config.node)), 2)
        if self.quota is not None:
            await self.quota.leave()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    def set_draining(self) -> None:
        """SIGTERM: out of every node's credentials with the next heartbeat, now."""
        self.draining = True
        self._beat.set()

    def _where(self) -> str:
        """The Redis address without its password."""
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"

    def _lost(self, exc: BaseException, quiet: bool = False) -> None:
        self.errors += 1
        was = self.connected
        self.connected = False
        now = time.monotonic()
        if not quiet and (was or now - self._logged >= LOG_INTERVAL):
            self._logged = now
            log.warning(
                "fleet: Redis at %s: %s; serving with the last known revocations and "
                "handing out only this node (logged once a minute)",
                self._where(),
                exc,
            )

    def _after_error(self, exc: Exception, failures: int, what: str) -> float:
        """How long a loop that must go on waits after a failed round: a Redis error
        marks Redis away and backs off; anything else is counted and logged with its
        traceback once a minute, and retried slowly."""
        if isinstance(exc, self._errors):
            self._lost(exc)
            return BACKOFF[min(failures, len(BACKOFF) - 1)]
        self.errors += 1
        now = time.monotonic()
        if now - self._failed_logged >= LOG_INTERVAL:
            self._failed_logged = now
            log.exception("fleet: %s failed (retried; logged once a minute)", what)
        return BACKOFF[-1]

    def _check_pace(self, took: float) -> None:
        """A heartbeat slower than the TTL lets this node's record expire: say so."""
        now = time.monotonic()
        if took > self.config.ttl / 2 and now - self._slow_logged >= LOG_INTERVAL:
            self._slow_logged = now
            log.warning(
                "fleet: a heartbeat took %.1f s (fleet.heartbeat %g s): this node may drop "
                "out of the registry; is Redis or this host overloaded? (logged once a minute)",
                took,
                self.config.heartbeat,
            )

    def _back(self) -> None:
        if not self.connected:
            self.connected = True
            log.info("fleet: connected to Redis at %s as node %s", self._where(), self.config.node)

    # ---- registry -------------------------------------------------------------------------

    async def _record(self) -> NodeRecord:
        uris = self.own_uris()
        try:
            info = await self.summary()
        except Exception:  # a worker unreachable: report no load
            info = {}
        return NodeRecord(
            id=self.config.node,
            region=self.config.region,
            zone=self.config.zone,
            stun=list(uris.stun),
            turn=list(uris.turn),
            ready=await self.ready() and not self.draining,
            draining=self.draining,
            allocations=int(info.get("allocations", 0)),
            relay_ports_free=int(info.get("relay_ports_free", 0)),
            updated=time.time(),
            started=self.started,
            pid=os.getpid(),
            admin=self.config.admin_url,
        )

    async def _heartbeat(self) -> str | None:
        """Write our record, read everyone's; returns the Redis data set's generation
        (another than ours: Redis restarted empty or failed over, even if the client
        reconnected without an error)."""
        record = await self._record()
        ttl_ms = int(self.config.ttl * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self._key(record.id), json.dumps(asdict(record)), px=ttl_ms)
        if self.quota is not None:  # our quota leases count while this lives
            pipe.set(self.quota.alive_key, "1", px=ttl_ms)
        pipe.get(self._generation_key)
        generation = (await pipe.execute())[-1]
        self.nodes = await read_registry(self.redis, self.config.prefix)
        self.snapshot_at = time.monotonic()
        self._back()
        return generation  # type: ignore[no-any-return]

    async def _heartbeats(self) -> None:
        failures = 0
        while True:
            try:
                began = time.monotonic()
                generation = await self._heartbeat()
                if self._pending or self._pending_removed or generation != self._generation:
                    if self.quota is not None and generation != self._generation:
                        self.quota.republish()  # Redis lost its data: our counts again
                    await self._reconcile()
                if self.quota is not None:
                    await self.quota.flush()
                self._check_pace(time.monotonic() - began)
                failures = 0
                delay = self.config.heartbeat
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nothing may end the membership
                delay = self._after_error(exc, failures, "heartbeat")
                failures += 1
            self._beat.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat.wait(), delay)

    def admin_peers(self) -> dict[str, str]:
        """The other nodes' admin API URLs (from the last snapshot), by node name."""
        return {n.id: n.admin for n in self.nodes.values() if n.admin and n.id != self.config.node}

    @property
    def node_name(self) -> str:
        return self.config.node

    def healthy_nodes(self) -> list[NodeRecord]:
        """Healthy nodes of the last snapshot; when Redis is away, this node alone."""
        fresh = self.connected and time.monotonic() - self.snapshot_at < self.config.ttl
        nodes = list(self.nodes.values()) if fresh else []
        return [n for n in nodes if n.healthy]

    def uris_for(self, region: str | None) -> ServerUris:
        """ICE servers for a caller: healthy nodes, its region first, then by load."""
        nodes = self.healthy_nodes()
        if not nodes:  # Redis away, or no node ready: this one (unless draining)
            return self.own_uris() if not self.draining else ServerUris((), ())

        def order(n: NodeRecord) -> tuple[int, int, str]:
            return (0 if region and n.region == region else 1, n.allocations, n.id)

        chosen = sorted(nodes, key=order)[: self.config.max_servers]
        stun: list[str] = []
        turn: list[str] = []
        for n in chosen:
            stun += [u for u in n.stun if u not in stun]
            turn += [u for u in n.turn if u not in turn]
        return ServerUris(tuple(stun), tuple(turn))

    def region_of(self, headers: Any, client_ip: str | None) -> str | None:
        """The caller's region: the configured header, else its address in a region's
        networks, else this node's (a caller that reached us is likely near us)."""
        c = self.config
        if c.region_header:
            value = headers.get(c.region_header, "")
            if value and len(value) <= 64:
                return str(value)
        if client_ip:
            try:
                addr = ipaddress.ip_address(client_ip)
            except ValueError:
                return c.region or None
            for name, networks in c.regions:
                if any(addr in net for net in networks):
                    return name
        return c.region or None

    # ---- revocations ----------------------------------------------------------------------

    def publish(self, user: str, until: float | None, reason: str = "") -> None:
        """A revocation made (until) or lifted (None) here: to every node."""
        if until is None:
            self._pending.pop(user, None)
            self._pending_removed.add(user)
        else:
            self._pending_removed.discard(user)
            self._pending[user] = (until, reason)
        task = asyncio.get_running_loop().create_task(self._push())
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _push(self) -> None:
        try:
            await self._write_pending()
        except self._errors as exc:  # kept pending, pushed on reconnect
            self._lost(exc)

    async def _write_pending(self) -> None:
        pending, removed = dict(self._pending), set(self._pending_removed)
        if not pending and not removed:
            return
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        for user, (until, reason) in pending.items():
            pipe.hset(self._revocations, user, json.dumps([until, reason]))
            pipe.hdel(self._lifted, user)
        for user in removed:
            pipe.hdel(self._revocations, user)
            pipe.hset(self._lifted, user, str(now))  # explicit: absence alone lifts nothing
        pipe.publish(self._revocations, "changed")
        await pipe.execute()
        for user in pending:
            if self._pending.get(user) == pending[user]:
                del self._pending[user]
        self._pending_removed -= removed

    async def _read_revocations(self) -> tuple[str | None, dict[str, str], dict[str, str]]:
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self._generation_key)
        pipe.hgetall(self._revocations)
        pipe.hgetall(self._lifted)
        generation, raw, lifted = await pipe.execute()
        return generation, raw, lifted

    async def _republish(self) -> None:
        """Redis is new to us (our first contact, a restart that lost its data, a
        failover): give it every revocation this node enforces, never over an entry
        that is there (HSETNX), and learn its generation."""
        pipe = self.redis.pipeline(transaction=True)
        if self.admin is not None:
            for user, (until, reason) in self.admin.revocations.items():
                pipe.hsetnx(self._revocations, user, json.dumps([until, reason]))
        pipe.set(self._generation_key, secrets.token_hex(8), nx=True)
        pipe.get(self._generation_key)
        self._generation = (await pipe.execute())[-1]

    async def _reconcile(self) -> None:
        """Push what was made here meanwhile, read the fleet's revocations, apply."""
        await self._write_pending()
        generation, raw, lifted = await self._read_revocations()
        if generation is None or generation != self._generation:
            await self._republish()
            generation, raw, lifted = await self._read_revocations()
        now = time.time()
        entries: Revocations = {}
        expired = []
        for user, value in raw.items():
            try:
                until, reason = json.loads(value)
                until = float(until)
            except (ValueError, TypeError):
                continue
            if until > now:
                entries[str(user)] = (until, str(reason))
            else:
                expired.append(user)
        stale = [u for u, t in lifted.items() if not _float(t) > now - LIFTED_KEPT]
        pipe = self.redis.pipeline(transaction=False)
        if expired:
            pipe.hdel(self._revocations, *expired)
        if stale:
            pipe.hdel(self._lifted, *stale)
        if expired or stale:
            await pipe.execute()
        if self.admin is not None:
            await self.admin.apply_fleet(entries, set(lifted) - set(stale) - set(entries))

    async def _listen(self) -> None:
        """Reconcile on every "changed" message, and whenever the subscription (re)starts."""
        failures = 0
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self._revocations)
                await self._reconcile()
                failures = 0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                    if message is not None:
                        await self._reconcile()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except Exception as exc:  # nothing may end the subscription
                delay = self._after_error(exc, failures, "revocation sync")
                failures += 1
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            await asyncio.sleep(delay)


async def join_fleet(
    settings: Settings,
    own_uris: Callable[[], ServerUris],
    ready: Callable[[], Awaitable[bool]],
    summary: Callable[[], Awaitable[dict[str, Any]]],
    admin: AdminApi,
    registry: CollectorRegistry,
    quota: FleetQuota | None = None,
) -> FleetNode | None:
    """This process's membership when fleet.redis is set (one process, or a supervisor
    for its workers): revocations made here go out, the fleet's come in, the registry
    is watched; raises OSError when Redis is unreachable and fleet.required."""
    config = FleetConfig.from_settings(settings)
    if config is None:
        return None
    node = FleetNode(config, own_uris, ready, summary, admin, quota)
    admin.publish = node.publish
    admin.fleet = node
    await node.start()
    registry.register(FleetCollector(node))
    if quota is not None:
        registry.register(FleetQuotaCollector(quota))
    return node
