"""What the admin API reads and ends: the allocations of one process's core
(LocalBackend), the filters of a listing, and the summary of one or several processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from turnserver.core.allocation import Allocation
from turnserver.core.five_tuple import format_address

if TYPE_CHECKING:
    from turnserver.io.runtime import ServerRuntime


@dataclass(frozen=True)
class Filters:
    """What GET /admin/v1/allocations selects on."""

    user: str = ""
    client: str = ""
    peer: str = ""
    transport: str = ""
    tenant: str = ""

    def match_allocation(self, alloc: Allocation) -> bool:
        """Does the allocation match? Tested on the object, before its JSON is built:
        50,000 allocations page in under 20 ms."""
        if self.user and alloc.user != self.user:
            return False
        if self.transport and alloc.five_tuple.transport.value != self.transport:
            return False
        if self.tenant and alloc.tenant != self.tenant:
            return False
        client = alloc.five_tuple.client
        if self.client and self.client not in (client[0], format_address(client)):
            return False
        return not self.peer or self.peer in alloc.permissions


class AdminBackend(Protocol):
    """Where the admin API's answers come from: this process, or every worker."""

    async def allocations(self, filters: Filters, limit: int, cursor: str) -> list[dict[str, Any]]:
        """Matching allocations sorted by id, after `cursor`, at most `limit`."""

    async def allocation(self, allocation_id: str) -> dict[str, Any] | None: ...

    async def end(self, allocation_id: str) -> bool: ...

    async def revoke(self, user: str, until: float, reason: str) -> int:
        """Apply a revocation; returns how many live allocations ended."""

    async def unrevoke(self, user: str) -> bool: ...

    async def summary(self) -> dict[str, Any]: ...


class LocalBackend:
    """This process's core."""

    def __init__(self, runtime: ServerRuntime, worker: int = 0) -> None:
        self.runtime = runtime
        self.worker = worker

    def _info(self, alloc: Allocation, now: float) -> dict[str, Any]:
        return {**self.runtime.core.allocation_info(alloc, now), "worker": self.worker}

    def _fold_kernel_counts(self) -> None:
        """What the kernel fast path relayed joins the allocations' counters first."""
        offload = self.runtime.offload
        if offload is not None:
            offload.fold(self.runtime.core.allocations)

    async def allocations(self, filters: Filters, limit: int, cursor: str) -> list[dict[str, Any]]:
        self._fold_kernel_counts()
        core = self.runtime.core
        now = self.runtime.now()
        by_id = core.allocations_by_id
        matching = sorted(i for i, a in by_id.items() if i > cursor and filters.match_allocation(a))
        return [self._info(by_id[i], now) for i in matching[:limit]]

    async def allocation(self, allocation_id: str) -> dict[str, Any] | None:
        self._fold_kernel_counts()
        alloc = self.runtime.core.allocations_by_id.get(allocation_id)
        return self._info(alloc, self.runtime.now()) if alloc is not None else None

    async def end(self, allocation_id: str) -> bool:
        ended = self.runtime.core.end_allocation(allocation_id, "admin", self.runtime.now())
        self.runtime.after_core_call()
        return ended

    async def revoke(self, user: str, until: float, reason: str) -> int:
        ended = self.runtime.core.revoke(user, until, reason, self.runtime.now())
        self.runtime.after_core_call()
        return ended

    async def unrevoke(self, user: str) -> bool:
        return self.runtime.core.unrevoke(user)

    async def summary(self) -> dict[str, Any]:
        self._fold_kernel_counts()
        core = self.runtime.core
        by_transport: dict[str, int] = {}
        users: dict[str, list[int]] = {}
        for alloc in core.allocations.values():
            t = alloc.five_tuple.transport.value
            by_transport[t] = by_transport.get(t, 0) + 1
            entry = users.setdefault(alloc.user, [0, 0])
            entry[0] += 1
            entry[1] += alloc.bytes_to_peer + alloc.bytes_to_client
        return {
            "allocations": len(core.allocations),
            "by_transport": by_transport,
            "users": users,
            "relay_ports_free": core.relay_ports_free(),
            "revocations": len(core.revocations),
            "workers": 1,
        }


def summarize(parts: list[dict[str, Any]], top: int = 10) -> dict[str, Any]:
    """Merge per-process summaries; top users by allocations and by bytes."""
    by_transport: dict[str, int] = {}
    users: dict[str, list[int]] = {}
    for part in parts:
        for t, n in part["by_transport"].items():
            by_transport[t] = by_transport.get(t, 0) + n
        for u, (n, b) in part["users"].items():
            entry = users.setdefault(u, [0, 0])
            entry[0] += n
            entry[1] += b
    ranked = sorted(users.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    by_bytes = sorted(users.items(), key=lambda kv: (-kv[1][1], kv[0]))[:top]
    return {
        "allocations": sum(p["allocations"] for p in parts),
        "by_transport": by_transport,
        "top_users_by_allocations": [{"user": u, "allocations": v[0]} for u, v in ranked],
        "top_users_by_bytes": [{"user": u, "bytes": v[1]} for u, v in by_bytes],
        "relay_ports_free": sum(p["relay_ports_free"] for p in parts),
        "revocations": max((p["revocations"] for p in parts), default=0),
        "workers": sum(p["workers"] for p in parts),
    }
