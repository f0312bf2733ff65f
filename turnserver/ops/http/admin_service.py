"""The admin API with its revocations file: loaded at start, on SIGHUP and when the file
changes, applied to this process's core, and served."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from turnserver.ops.config.values import ConfigError
from turnserver.ops.http.admin_api import AdminApi, log
from turnserver.ops.http.revocations import Revocations, RevocationStore
from turnserver.ops.http.serve import serve_app


class AdminService:
    """The admin API with its revocations file: loaded at start, on SIGHUP and when the
    file changes (checked every WATCH_INTERVAL seconds), and applied to the core."""

    WATCH_INTERVAL = 2.0

    def __init__(
        self,
        api: AdminApi,
        file: RevocationStore,
        apply: Callable[[Revocations], int] | None = None,
    ) -> None:
        self.api = api
        self.file = file
        self.apply = apply  # to this process's core (None in a supervisor)
        api.on_change = apply
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Read the revocations file and apply it; a bad file keeps the old state."""
        try:
            entries = self.file.load(self.api.clock())
        except ConfigError as exc:
            log.error("revocations file rejected, keeping the old revocations: %s", exc)
            return
        self.api.apply_file(entries)
        if self.apply is not None:
            ended = self.apply(self.api.revocations)
            if ended:
                log.warning("revocations file: %d allocations of revoked users ended", ended)

    def watch(self) -> None:
        """Re-read the revocations file whenever it changes."""
        if self.file.path and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_file())

    async def start(self, host: str, port: int, ssl_context: Any = None) -> int:
        """Serve the admin API (the revocations are loaded already: see load)."""
        self._runner, self.port = await serve_app(
            self.api.app, host, port, ssl_context, name="admin"
        )
        return self.port

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(self.WATCH_INTERVAL)
            if self.file.changed():
                log.info("revocations file changed: reloading")
                self.load()

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
