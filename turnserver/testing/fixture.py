"""TurnServerFixture: a `turnserver dev` server for an application's relay-only tests,
as a subprocess or in the caller's event loop, with credentials, iceServers and live
impairment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from turnserver.testing.processes import free_ports, stop_process, wait_for


class TurnServerFixture:
    """A `turnserver dev` server for an application's tests, on loopback with ephemeral
    ports: UDP and TCP, TLS (self-signed for localhost), loopback peers allowed, and
    developer-mode impairment.

        async with TurnServerFixture() as turn:             # a subprocess
            config = {"iceServers": turn.ice_servers(), "iceTransportPolicy": "relay"}
            turn.impair(udp="block")                         # the firewall drops UDP
            assert turn.allocations()

    `in_process=True` runs the server in the caller's event loop instead (async only):
    faster to start, and what it logs goes to the caller's logging.
    """

    def __init__(
        self,
        *,
        in_process: bool = False,
        impair: dict[str, str] | None = None,
        seed: int = 1,
        host: str = "127.0.0.1",
        state_dir: Path | None = None,
        log_level: str = "warning",
        start_timeout: float = 20.0,
    ) -> None:
        self.in_process = in_process
        self.initial_impairment = dict(impair or {})
        self.seed = seed
        self.host = host
        self.log_level = log_level
        self.start_timeout = start_timeout
        self._own_dir: Any = None
        if state_dir is None:
            import tempfile

            self._own_dir = tempfile.TemporaryDirectory(prefix="turnserver-fixture-")
            state_dir = Path(self._own_dir.name)
        self.state_dir = state_dir
        self.info: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._server: Any = None  # turnserver.ops.process.app.Server when in process

    # -- lifecycle ----------------------------------------------------------------------

    def _args(self) -> list[str]:
        port, tls_port, api_port, admin_port = free_ports(4)  # four different numbers
        args = [
            "--host", self.host,
            "--port", str(port),
            "--tls-port", str(tls_port),
            "--api-port", str(api_port),
            "--admin-port", str(admin_port),
            "--state-dir", str(self.state_dir),
            "--ready-file", str(self.state_dir / "ready.json"),
            "--log-level", self.log_level,
            "--impair-seed", str(self.seed),
        ]  # fmt: skip
        for transport, spec in self.initial_impairment.items():
            args += ["--impair", f"{transport}={spec}"]
        return args

    def start(self) -> TurnServerFixture:
        """Start the subprocess and wait until every listener is bound."""
        if self.in_process:
            raise RuntimeError("an in-process server starts with `async with`")
        ready = self.state_dir / "ready.json"
        ready.unlink(missing_ok=True)
        self.log_path = self.state_dir / "turnserver.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "turnserver", "dev", *self._args()],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped as a group
            )
        try:
            wait_for(self.proc, ready.exists, self.start_timeout, "no ready file")
        except RuntimeError:
            log_text = self.log_path.read_text()  # before stop() removes its directory
            self.stop()
            raise RuntimeError(f"turnserver dev did not start: {log_text}") from None
        self.info = json.loads(ready.read_text())
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> TurnServerFixture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> TurnServerFixture:
        if not self.in_process:
            import asyncio

            return await asyncio.get_running_loop().run_in_executor(None, self.start)
        import asyncio

        from turnserver.cli import build_parser
        from turnserver.ops.dev.local_server import dev_settings, dev_summary
        from turnserver.ops.dev.selfsigned import ensure_self_signed
        from turnserver.ops.process.app import Server

        args = build_parser().parse_args(["dev", *self._args()])  # the command's defaults
        ensure_self_signed(
            str(self.state_dir / "cert.pem"),
            str(self.state_dir / "key.pem"),
            ["localhost", self.host],
        )
        settings = dev_settings(args, self.state_dir)
        self._server = Server(settings, asyncio.get_running_loop())
        await self._server.start()
        self.info = dev_summary(settings, self._server)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None
        self.stop()

    # -- what a test uses ---------------------------------------------------------------

    @property
    def username(self) -> str:
        return str(self.info["username"])

    @property
    def credential(self) -> str:
        return str(self.info["credential"])

    def port(self, transport: str) -> int:
        """The port of the udp, tcp or tls listener."""
        return int(self.info["listen"][transport][1])

    def ice_servers(
        self, relay_only: bool = True, transports: tuple[str, ...] = ("udp", "tcp", "tls")
    ) -> list[dict[str, Any]]:
        """RTCIceServer dicts: TURN over the chosen transports (turns: for tls), and the
        STUN URI too unless relay_only."""
        urls: list[str] = []
        for t in transports:
            if t == "tls":
                urls.append(f"turns:{self.host}:{self.port('tls')}?transport=tcp")
            else:
                urls.append(f"turn:{self.host}:{self.port(t)}?transport={t}")
        servers: list[dict[str, Any]] = [
            {"urls": urls, "username": self.username, "credential": self.credential}
        ]
        if not relay_only:
            servers.insert(0, {"urls": [f"stun:{self.host}:{self.port('udp')}"]})
        return servers

    def impair(self, **specs: str) -> dict[str, Any]:
        """Change impairments now: impair(udp="block"), impair(tls="loss:5,delay:80"),
        impair(all="none"). Returns the server's view (impairment, counts)."""
        if self._server is not None:
            return dict(self._server.dev.apply(specs))
        return self._http("PUT", self.info["impairment_url"], specs, api=True)

    def impairment(self) -> dict[str, Any]:
        """The server's impairments and what they did so far, per transport."""
        if self._server is not None:
            return dict(self._server.dev.state())
        return self._http("GET", self.info["impairment_url"], None, api=True)

    def allocations(self) -> list[dict[str, Any]]:
        """The live allocations, as the admin API lists them."""
        if self._server is not None:
            runtime = self._server.runtime
            core, now = runtime.core, runtime.now()
            return [core.allocation_info(a, now) for a in core.allocations.values()]
        body = self._http("GET", f"{self.info['admin']}/admin/v1/allocations?limit=1000", None)
        return list(body["allocations"])

    def _http(self, method: str, url: str, body: Any, api: bool = False) -> dict[str, Any]:
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if api:
            headers["X-API-Key"] = self.info["api_key"]
        else:
            headers["Authorization"] = f"Bearer {self.info['admin_token']}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer
