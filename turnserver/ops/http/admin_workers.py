"""The admin API of a supervisor: each worker serves its own copy of the admin API on
an internal loopback port with an internal token; this backend asks them all and merges
(allocations are routed by the worker index their id starts with)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from turnserver.core.auth import ascii_int
from turnserver.ops.http.admin_backend import Filters, summarize
from turnserver.ops.http.revocations import Revocations


class WorkersBackend:
    """The parent of worker processes: asks each worker's admin API (on its internal
    loopback listener, with an internal token) and merges the answers."""

    def __init__(self, ports: Callable[[], list[int]], token: str) -> None:
        self.ports = ports
        self.headers = {"Authorization": f"Bearer {token}"}
        # revocations reach the workers in the order they were made: a (re)started
        # worker's full set and single changes never overtake each other
        self.revocations_lock = asyncio.Lock()

    async def _call(self, index: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        port = self.ports()[index]
        if not port:
            return 503, None
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.request(
                    method, f"http://127.0.0.1:{port}{path}", json=body, headers=self.headers
                ) as resp,
            ):
                return resp.status, await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 503, None

    async def _all(self, method: str, path: str, body: Any = None) -> list[tuple[int, Any]]:
        n = len(self.ports())
        return list(await asyncio.gather(*(self._call(i, method, path, body) for i in range(n))))

    async def allocations(self, filters: Filters, limit: int, cursor: str) -> list[dict[str, Any]]:
        query = "&".join(
            f"{k}={quote(v, safe='')}"
            for k, v in (
                ("user", filters.user),
                ("client", filters.client),
                ("peer", filters.peer),
                ("transport", filters.transport),
                ("tenant", filters.tenant),
                ("limit", str(limit)),
                ("cursor", cursor),
            )
            if v
        )
        merged: list[dict[str, Any]] = []
        for status, body in await self._all("GET", f"/admin/v1/allocations?{query}"):
            if status == 200:
                merged += body["allocations"]
        return sorted(merged, key=lambda a: a["id"])[:limit]

    @staticmethod
    def _worker_of(allocation_id: str) -> int | None:
        head = allocation_id.split("-", 1)[0]
        index = ascii_int(head[1:], 3) if head[:1] == "w" else None
        return index

    async def allocation(self, allocation_id: str) -> dict[str, Any] | None:
        index = self._worker_of(allocation_id)
        if index is None or index >= len(self.ports()):
            return None
        path = f"/admin/v1/allocations/{quote(allocation_id, safe='')}"
        status, body = await self._call(index, "GET", path)
        return body if status == 200 else None

    async def end(self, allocation_id: str) -> bool:
        index = self._worker_of(allocation_id)
        if index is None or index >= len(self.ports()):
            return False
        path = f"/admin/v1/allocations/{quote(allocation_id, safe='')}"
        status, _ = await self._call(index, "DELETE", path)
        return status == 200

    async def revoke(self, user: str, until: float, reason: str) -> int:
        body = {"user": user, "until": until, "reason": reason, "persist": False}
        async with self.revocations_lock:
            results = await self._all("POST", "/admin/v1/revocations", body)
        return sum(b["ended"] for s, b in results if s == 201 and b)

    async def unrevoke(self, user: str) -> bool:
        # every path part quoted: a name with / .. ? # % is one segment, nothing else
        path = f"/admin/v1/revocations/{quote(user, safe='')}?persist=false"
        async with self.revocations_lock:
            results = await self._all("DELETE", path)
        return any(s == 200 for s, _ in results)

    async def sync_revocations(self, index: int, entries: Callable[[], Revocations]) -> bool:
        """Give worker `index` every API-made revocation (`entries()`, read once the
        revocations before it went out): a worker that (re)started."""
        async with self.revocations_lock:
            body = {
                "revocations": [
                    {"user": u, "until": until, "reason": reason}
                    for u, (until, reason) in entries().items()
                ]
            }
            status, _ = await self._call(index, "PUT", "/admin/v1/revocations", body)
        return status == 200

    async def summary(self) -> dict[str, Any]:
        parts = [b["raw"] for s, b in await self._all("GET", "/admin/v1/summary?raw=1") if s == 200]
        return summarize(parts)
