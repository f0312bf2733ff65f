"""Where a running server can be found on this host: a small JSON state file it writes
once it serves (its pid, where /healthz answers, its UDP listeners) and removes when it
stops. `turnserver healthcheck` (the container image's HEALTHCHECK) reads it, so the
health check asks this server's own endpoint whatever --metrics-listen says, never
whatever else holds a port on the host (--network host).

The file: $TURNSERVER_STATE_FILE if set, else $XDG_RUNTIME_DIR/turnserver/state.json,
else /tmp/turnserver-<uid>/state.json (a directory only this user may write).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

ENV = "TURNSERVER_STATE_FILE"
log = logging.getLogger("turnserver")


def default_path() -> Path:
    explicit = os.environ.get(ENV)
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(tempfile.gettempdir()) / f"turnserver-{os.getuid()}"
    return base / "turnserver" / "state.json" if runtime else base / "state.json"


def write_state(
    metrics: tuple[str, int] | None, udp: list[tuple[str, int]], path: Path | None = None
) -> Path | None:
    """Record this process as the running server (None when it cannot be written: the
    server runs on and says so; `turnserver healthcheck` then fails and says why)."""
    host = metrics[0] if metrics else ""
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    body: dict[str, Any] = {
        "pid": os.getpid(),
        "healthz": f"http://{_hostport(host, metrics[1])}/healthz" if metrics else "",
        "udp": [_hostport(h, p) for h, p in udp],
    }
    target: Path | str = path or "the state file"
    try:
        target = path or default_path()
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, target)
    except OSError as exc:  # a read-only root, no usable temporary directory
        log.warning(
            "cannot write %s (%s): `turnserver healthcheck` will not find this server; "
            "set %s to a writable path",
            target,
            exc.strerror or exc,
            ENV,
        )
        return None
    return target


def remove_state(path: Path | None = None) -> None:
    try:
        target = path or default_path()
        if json.loads(target.read_text()).get("pid") == os.getpid():
            target.unlink()
    except (OSError, ValueError):
        pass


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def healthcheck_command(args: argparse.Namespace) -> int:
    """`turnserver healthcheck`: 0 when the server of the state file answers /healthz."""
    path = Path(args.state_file) if args.state_file else default_path()
    try:
        state = json.loads(path.read_text())
        pid = int(state["pid"])
        url = str(state["healthz"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"turnserver healthcheck: no running server found ({path}: {exc})", file=sys.stderr)
        return 1
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        print(f"turnserver healthcheck: the server (pid {pid}) is gone", file=sys.stderr)
        return 1
    except PermissionError:
        pass  # another user's process: it exists
    if not url:
        print(f"turnserver healthcheck: pid {pid} runs, metrics are off (no /healthz)")
        return 0
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            ok = resp.status == 200
    except OSError as exc:
        print(f"turnserver healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"turnserver healthcheck: {url}: {'ok' if ok else 'not ok'}")
    return 0 if ok else 1
