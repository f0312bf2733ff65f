"""The fleet's per-user allocation quota (fleet.max_allocations_per_user) on Redis.

Keys, under fleet.prefix:
  quota:<user>          hash: node incarnation -> allocations of the user it holds
  alive:<incarnation>   set with every heartbeat; expires with the node's record

A lease is one Lua script (atomic: no check-then-set race between nodes): it sums the
user's counts of the incarnations still alive (pruning the others, so a node killed
with -9 frees its leases when its heartbeat expires), and writes this node's count
plus one if the sum is under the limit. Each node writes only its own field, with
absolute values under one lock, so a retried or reordered write can never drift.
Releases are written in the background (batched); after a Redis outage or a new Redis
data set the node writes all its counts again.

Redis away: a lease is decided by this node's own count against the limit (the quota
holds per node, never looser than that), counted as `local` and written once Redis is
back. One Redis round trip per Allocate that passes every other check; none on the
relay path. A node's worker processes ask their supervisor over the worker bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from turnserver.core import events as ev
from turnserver.core.events import EventTable
from turnserver.core.fleet_leases import FleetLeases
from turnserver.core.quota import decrement
from turnserver.ops.fleet.registry import FleetConfig

if TYPE_CHECKING:
    from turnserver.io.runtime import ServerRuntime
    from turnserver.ops.config.settings import Settings

log = logging.getLogger("turnserver.fleet")
LEASE_TIMEOUT = 1.0  # a Redis answer slower than this: decided locally
LOG_INTERVAL = 60.0
OWN = -1  # the owner of leases taken by this process's own core (not a worker's)

# KEYS[1] quota:<user>; ARGV: our incarnation, limit, alive-key prefix, our count now
LEASE_SCRIPT = """
local mine = tonumber(ARGV[4])
local total = mine
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local f = fields[i]
  if f ~= ARGV[1] then
    if redis.call('EXISTS', ARGV[3] .. f) == 1 then
      total = total + tonumber(fields[i + 1])
    else
      redis.call('HDEL', KEYS[1], f)
    end
  end
end
if total >= tonumber(ARGV[2]) then
  if mine > 0 then redis.call('HSET', KEYS[1], ARGV[1], mine)
  else redis.call('HDEL', KEYS[1], ARGV[1]) end
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], mine + 1)
return 1
"""


class FleetQuota:
    """This node's leases (one per allocation of a user), mirrored in Redis."""

    def __init__(self, limit: int, prefix: str, node: str) -> None:
        self.limit = limit
        self.prefix = prefix
        self.incarnation = f"{node}/{secrets.token_hex(6)}"  # a restart is a new one
        self.by_owner: dict[int, dict[str, int]] = {}  # worker (or OWN) -> user -> leases
        self.dirty: set[str] = set()  # users whose field in Redis is not `held` yet
        self.results = {"granted": 0, "refused": 0, "local_granted": 0, "local_refused": 0}
        self.redis: Any = None
        self._script: Any = None
        self._errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
        self._on_error: Callable[[BaseException], None] = lambda exc: None
        self._connected: Callable[[], bool] = lambda: False
        self._lock = asyncio.Lock()
        self._flushing: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> FleetQuota | None:
        """This node's book when fleet.max_allocations_per_user is set in a fleet."""
        config = FleetConfig.from_settings(s)
        if config is None or not config.max_allocations_per_user:
            return None
        return cls(config.max_allocations_per_user, config.prefix, config.node)

    def attach(
        self,
        redis: Any,
        errors: tuple[type[BaseException], ...],
        on_error: Callable[[BaseException], None],
        connected: Callable[[], bool],
    ) -> None:
        """Use this Redis client (the fleet node's) while `connected` says it answers
        (the heartbeat's word: a lease never waits on a Redis known to be away)."""
        self.redis = redis
        self._connected = connected
        self._script = redis.register_script(LEASE_SCRIPT)
        self._errors = (*errors, TimeoutError)
        self._on_error = on_error
        self.dirty |= self.users()

    @property
    def alive_key(self) -> str:
        return f"{self.prefix}alive:{self.incarnation}"

    def _key(self, user: str) -> str:
        return f"{self.prefix}quota:{user}"

    def held(self, user: str) -> int:
        """Leases of `user` this node holds (its workers' together)."""
        return sum(counts.get(user, 0) for counts in self.by_owner.values())

    def users(self) -> set[str]:
        return {user for counts in self.by_owner.values() for user in counts}

    async def lease(self, user: str, owner: int) -> bool:
        """One more allocation of `user` on this node, if the fleet has room."""
        async with self._lock:
            mine = self.held(user)
            ok: bool | None = None
            if self._script is not None and self._connected():
                try:
                    answer = await asyncio.wait_for(
                        self._script(
                            keys=[self._key(user)],
                            args=[self.incarnation, self.limit, f"{self.prefix}alive:", mine],
                        ),
                        LEASE_TIMEOUT,
                    )
                    ok = bool(int(answer))
                    self.dirty.discard(user)  # the script wrote our field
                    self.results["granted" if ok else "refused"] += 1
                except self._errors as exc:
                    self._on_error(exc)
            if ok is None:  # Redis away: this node's own count decides
                ok = mine < self.limit
                self.results["local_granted" if ok else "local_refused"] += 1
                self.dirty.add(user)
            if ok:
                counts = self.by_owner.setdefault(owner, {})
                counts[user] = counts.get(user, 0) + 1
            return ok

    def release(self, user: str, owner: int) -> None:
        """An allocation of `user` that held a lease ended (written soon, batched)."""
        counts = self.by_owner.get(owner)
        if counts is None or counts.get(user, 0) <= 0:
            return  # not ours (a worker restarted since): nothing to give back
        decrement(counts, user)
        self.dirty.add(user)
        self._flush_soon()

    def owner_gone(self, owner: int) -> None:
        """A worker died: its allocations, and so its leases, are gone."""
        self.dirty |= set(self.by_owner.pop(owner, {}))
        self._flush_soon()

    def republish(self) -> None:
        """Redis came back, or is another data set: write every count again."""
        self.dirty |= self.users()
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flushing is None and self.redis is not None and self.dirty:
            self._flushing = asyncio.get_running_loop().create_task(self._flush_task())

    async def _flush_task(self) -> None:
        try:
            await self.flush()
        except Exception as exc:  # kept dirty; the next heartbeat tries again
            self._on_error(exc)
        finally:
            self._flushing = None

    async def flush(self) -> None:
        """Write the counts of the users marked dirty (absolute values)."""
        if self.redis is None or not self.dirty:
            return
        async with self._lock:
            users = list(self.dirty)
            pipe = self.redis.pipeline(transaction=False)
            for user in users:
                n = self.held(user)
                if n > 0:
                    pipe.hset(self._key(user), self.incarnation, n)
                else:
                    pipe.hdel(self._key(user), self.incarnation)
            await pipe.execute()
            self.dirty.difference_update(users)

    async def leave(self) -> None:
        """A clean stop: this node's leases are free at once."""
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.delete(self.alive_key), 2)


class FleetQuotaCollector(Collector):
    """turn_fleet_quota_*: leases asked for, and held."""

    def __init__(self, quota: FleetQuota) -> None:
        self.quota = quota

    def collect(self) -> Iterator[Metric]:
        q = self.quota
        leases = CounterMetricFamily(
            "turn_fleet_quota_leases",
            "Fleet-wide per-user quota answers (local_*: decided without Redis, by this "
            "node's own count)",
            labels=["result"],
        )
        for result, n in q.results.items():
            leases.add_metric([result], n)
        yield leases
        yield GaugeMetricFamily(
            "turn_fleet_quota_held",
            "Allocations of this node that hold a fleet-wide quota lease",
            value=sum(sum(counts.values()) for counts in q.by_owner.values()),
        )
        yield GaugeMetricFamily(
            "turn_fleet_quota_unwritten_users",
            "Users whose lease count this node has not yet written to Redis",
            value=len(q.dirty),
        )


class LeaseAgent:
    """A core's side: for each FleetLeaseNeeded asks for the lease (without blocking
    anyone else), runs the Allocate again with the answer and sends its response; each
    FleetLeaseReleased gives one back."""

    def __init__(
        self,
        runtime: ServerRuntime,
        ask: Callable[[str], Awaitable[bool]],
        give_back: Callable[[str], None],
    ) -> None:
        self.runtime = runtime
        self.ask = ask
        self.give_back = give_back
        self._tasks: set[asyncio.Task[None]] = set()
        self._logged = -LOG_INTERVAL

    def sink(self) -> EventTable:
        return EventTable(
            {ev.FleetLeaseNeeded: self._needed, ev.FleetLeaseReleased: self._released}
        )

    def _needed(self, event: ev.FleetLeaseNeeded) -> None:
        task = self.runtime.loop.create_task(self._answer(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _released(self, event: ev.FleetLeaseReleased) -> None:
        self.give_back(event.user)

    async def _answer(self, event: ev.FleetLeaseNeeded) -> None:
        try:
            ok = await self.ask(event.user)
        except Exception:  # a bug: refuse this one (486, the client may retry), say so
            ok = False
            now = time.monotonic()
            if now - self._logged >= LOG_INTERVAL:
                self._logged = now
                log.exception("fleet quota: asking for a lease failed (logged once a minute)")
        runtime = self.runtime
        response = runtime.core.fleet_lease_result(
            event.five_tuple, event.transaction_id, event.user, event.message, ok, runtime.now()
        )
        if response is not None:
            runtime.answer(event.five_tuple, response)
        runtime.after_core_call()


def enforce_fleet_quota(
    runtime: ServerRuntime,
    limit: int,
    ask: Callable[[str], Awaitable[bool]],
    give_back: Callable[[str], None],
) -> None:
    """Make this process's core wait for a fleet lease before each new allocation."""
    runtime.core.fleet_leases = FleetLeases(limit)
    runtime.event_sinks.append(LeaseAgent(runtime, ask, give_back).sink())
