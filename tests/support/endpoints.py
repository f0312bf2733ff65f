"""HTTP endpoints the tests start: a usage-record webhook receiver that can go down
and come back on the same port, and an authorization hook whose answers the test
steers (slow, failing, flapping)."""

from __future__ import annotations

import abc
import asyncio
import json
import random
import socket
from collections import Counter
from typing import Any

from aiohttp import web

from tests.support.server import _ephemeral_ports


def stable_port() -> int:
    """A TCP port on 127.0.0.1 outside the ephemeral range: an endpoint that goes down
    comes back on it, and no client socket of the run can take it meanwhile."""
    _, hi = _ephemeral_ports()
    candidates = list(range(hi + 1, 65536)) or list(range(20000, 30000))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port outside the ephemeral range")


class _Endpoint(abc.ABC):
    def __init__(self) -> None:
        self.port = stable_port()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        """One route: POST / to the endpoint's handler."""
        app = web.Application()
        app.router.add_post("/", self._post)
        return app

    @abc.abstractmethod
    async def _post(self, request: web.Request) -> web.Response: ...

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def up(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        self._runner = runner

    async def down(self) -> None:
        """Stop listening: connections are refused, as when the receiver is away."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class RecordReceiver(_Endpoint):
    """Takes webhook batches ({"schema": 1, "records": [...]}) and keeps every record;
    `ids` counts deliveries per record id (above 1: a duplicate)."""

    def __init__(self, token: str = "") -> None:
        super().__init__()
        self.token = token
        self.records: dict[str, dict[str, Any]] = {}
        self.ids: Counter[str] = Counter()
        self.batches = 0
        self.unauthorized = 0

    async def _post(self, request: web.Request) -> web.Response:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            self.unauthorized += 1
            return web.Response(status=401)
        body = await request.json()
        assert body["schema"] == 1
        self.batches += 1
        for record in body["records"]:
            self.ids[record["id"]] += 1
            self.records[record["id"]] = record  # deduplicated by id, as a receiver does
        return web.Response(status=204)


class HookServer(_Endpoint):
    """An identity system: users -> passwords (and tenants); `mode` is ok, slow
    (answers after `delay`), fail (500) or refuse-all; every question is counted with
    its time."""

    def __init__(self, users: dict[str, tuple[str, str]], token: str = "") -> None:
        super().__init__()
        self.users = users  # username -> (password, tenant)
        self.token = token
        self.mode = "ok"
        self.delay = 2.0
        self.asked: list[tuple[float, str]] = []
        self.bodies: list[dict[str, Any]] = []

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        loop = asyncio.get_running_loop()
        self.asked.append((loop.time(), body["username"]))
        self.bodies.append(body)
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        if self.mode == "fail":
            return web.Response(status=500)
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        known = self.users.get(body["username"])
        if known is None or self.mode == "refuse-all":
            return web.json_response({"allow": False})
        password, tenant = known
        answer = {"allow": True, "password": password, "ttl": 600, "tenant": tenant}
        return web.Response(text=json.dumps(answer), content_type="application/json")
