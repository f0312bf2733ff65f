"""Serving an aiohttp application on one address (the credentials API, the admin API,
metrics and health)."""

from __future__ import annotations

import ssl

from aiohttp import web


async def serve_app(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Start serving `app` on host:port (HTTPS with ssl_context); returns the runner (to
    clean up) and the bound port (port 0: the kernel's choice)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    bound: int = runner.addresses[0][1] if runner.addresses else port
    return runner, bound
