"""The admin API across a fleet (ops/fleet/node.py): a listing that fans out to every node's
admin API (found in the registry, asked with the caller's token), and allocation ids
`<node>~<id>` that any node forwards to the node that owns them."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from turnserver.ops.http.admin_backend import AdminBackend, Filters

FLEET_ID = "~"  # `<node>~<id>`: an allocation of a fleet's node (no node name has one)
FANOUT_TIMEOUT = 3.0  # another node's admin answer


class FleetPeers(Protocol):
    """The fleet as the admin API sees it (ops/fleet/node.py FleetNode)."""

    @property
    def node_name(self) -> str: ...

    def admin_peers(self) -> dict[str, str]:
        """The other nodes' admin API base URLs, by node name."""


class FleetAdmin:
    """What AdminApi does for a fleet's node."""

    backend: AdminBackend
    fleet: FleetPeers | None

    async def _forward(
        self, request: web.Request, url: str, method: str = "GET"
    ) -> tuple[int, Any]:
        """The same admin request to another node of the fleet, with the caller's token
        (the nodes share admin tokens): its status and JSON body (502 when unreachable)."""
        timeout = aiohttp.ClientTimeout(total=FANOUT_TIMEOUT)
        headers = {"Authorization": request.headers.get("Authorization", "")}
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(method, url, headers=headers) as resp,
            ):
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return 502, {"error": f"node unreachable: {type(exc).__name__}", "status": 502}

    async def _on_owner(self, request: web.Request, allocation_id: str) -> web.Response | None:
        """GET or DELETE of a fleet id `<node>~<id>` of another node: that node's answer
        (404 for a node we do not know); None when the id is ours (or not a fleet id)."""
        node, sep, own_id = allocation_id.partition(FLEET_ID)
        if not sep or self.fleet is None or node == self.fleet.node_name:
            return None
        url = self.fleet.admin_peers().get(node)
        if url is None:
            return web.json_response(
                {"error": "no such node in the fleet", "status": 404}, status=404
            )
        quoted = urllib.parse.quote(own_id, safe="")
        status, body = await self._forward(
            request, f"{url}/admin/v1/allocations/{quoted}", request.method
        )
        if status == 200 and request.method == "DELETE":
            body = {"ended": allocation_id}
        return web.json_response(body, status=status)

    @staticmethod
    def _local_id(allocation_id: str) -> str:
        return allocation_id.rpartition(FLEET_ID)[2]  # ours, with or without our name

    async def _fleet_allocations(
        self, request: web.Request, filters: Filters, limit: int
    ) -> web.Response:
        """?fleet=1: this node's allocations and every other node's (each node's first
        `limit`), ids qualified by node; nodes that did not answer are named."""
        assert self.fleet is not None
        q = {k: v for k, v in request.query.items() if k not in ("fleet", "cursor")}
        query = urllib.parse.urlencode(q)
        peers = self.fleet.admin_peers()
        own = self.fleet.node_name
        local = self.backend.allocations(filters, limit, "")
        remote = [
            self._forward(request, f"{url}/admin/v1/allocations?{query}") for url in peers.values()
        ]
        got = await asyncio.gather(local, *remote)
        items = [{**a, "id": f"{own}{FLEET_ID}{a['id']}", "node": own} for a in got[0]]
        unreachable = []
        for name, (status, body) in zip(peers, got[1:], strict=True):
            if status != 200 or not isinstance(body, dict):
                unreachable.append(name)
                continue
            items += [
                {**a, "id": f"{name}{FLEET_ID}{a['id']}", "node": name}
                for a in body.get("allocations", [])
            ]
        return web.json_response({"allocations": items, "unreachable": unreachable})
