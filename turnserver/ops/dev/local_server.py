"""`turnserver dev`: a ready-to-use local server for relay-only testing (developer mode)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from turnserver.io.impairment import ImpairmentError
from turnserver.io.runtime import ListenAddress, ServerRuntime
from turnserver.ops.config.settings import Settings, build_settings
from turnserver.ops.dev.banner import print_banner


class RunningServer(Protocol):
    """What `turnserver dev` reads of ops.app.Server once it is ready."""

    runtime: ServerRuntime
    api_port: int

    @property
    def api_base(self) -> str: ...

    @property
    def admin_port(self) -> int: ...


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "turnserver-dev"


def _secret_file(path: Path) -> str:
    """A random secret kept in a 0600 file, made on first use."""
    if not path.exists() or not path.read_text().strip():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24) + "\n")
    os.chmod(path, 0o600)
    return path.read_text().strip()


def _account(path: Path) -> tuple[str, str]:
    """A Twilio-style account (SID, auth token) for the Tokens API, kept in a 0600 file."""
    if not path.exists() or ":" not in path.read_text():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"AC{secrets.token_hex(16)}:{secrets.token_urlsafe(24)}\n")
    os.chmod(path, 0o600)
    sid, _, token = path.read_text().strip().partition(":")
    return sid, token


def state_files(state: Path) -> str:
    """What the state directory holds and each file's mode, as it is on disk (the
    certificate is public, everything else only the owner's)."""
    shown = []
    for path in sorted(state.iterdir()):
        if path.is_file() and not path.name.endswith(".tmp"):
            shown.append(f"{path.name} {stat.S_IMODE(path.stat().st_mode):04o}")
    return ", ".join(shown)


def dev_settings(args: argparse.Namespace, state: Path) -> Settings:
    """Settings for `turnserver dev`: loopback listeners on UDP, TCP and TLS, loopback
    peers allowed, API (with /preflight and /dev/v1) and admin API, one worker."""
    host = args.host
    listen = (
        ListenAddress("udp", host, args.port),
        ListenAddress("tcp", host, args.port),
        ListenAddress("tls", host, args.tls_port),
    )
    overrides: dict[str, Any] = {
        "realm": "turnserver.local",
        "secrets": (_secret_file(state / "secret"),),
        "listen": listen,
        "relay_ips": (host,),
        "allow_loopback_peers": True,
        "api_listen": (host, args.api_port),
        "api_keys": (_secret_file(state / "api-key"),),
        "accounts": (_account(state / "account"),),
        "api_tls": False,
        "preflight_page": True,
        "admin_listen": (host, args.admin_port) if args.admin_port else None,
        "admin_tokens": (_secret_file(state / "admin-token"),) if args.admin_port else (),
        "cert_file": str(state / "cert.pem"),
        "key_file": str(state / "key.pem"),
        "metrics_listen": (host, args.metrics_port) if args.metrics_port else None,
        "workers": 1,
        "dev": True,
        "impairments": tuple(args.impair or ()),
        "impair_seed": 1 if args.impair_seed is None else args.impair_seed,
        "log_level": args.log_level,
        "probe_interval": 0.0,
    }
    if args.min_port:
        overrides["min_port"], overrides["max_port"] = args.min_port, args.max_port
    return build_settings({}, overrides, "turnserver dev")


def dev_summary(settings: Settings, server: RunningServer, user: str = "dev") -> dict[str, Any]:
    """What a developer (or a test fixture) needs: credential, iceServers, URLs."""
    from turnserver.ops.config.uris import server_uris
    from turnserver.ops.http.credentials import ice_servers_config, mint

    listen = list(server.runtime.bound_addresses())
    uris = server_uris(settings, listen)
    cred = mint(settings.secrets[0], user, 86400, time.time())
    host, _ = settings.api_listen or ("127.0.0.1", 0)
    api = f"http://{host}:{server.api_port}"
    admin_port = server.admin_port
    return {
        "username": cred.username,
        "credential": cred.password,
        "expires": cred.expires,
        "ice_servers": ice_servers_config(cred, uris, relay_only=True)["iceServers"],
        "listen": {a.scheme: [a.host, a.port] for a in listen},
        "api": api,
        "api_key": settings.api_keys[0],
        "preflight": f"{api}/preflight",
        "tokens_api": f"{api}/2010-04-01/Accounts/{settings.accounts[0][0]}/Tokens.json",
        "account": list(settings.accounts[0]),
        "impairment_url": f"{api}/dev/v1/impairment",
        "admin": f"http://{host}:{admin_port}" if admin_port else None,
        "admin_token": settings.admin_tokens[0] if settings.admin_tokens else None,
        "cert": settings.cert_file,
        "pid": os.getpid(),
    }


def dev_command(args: argparse.Namespace) -> int:
    """`turnserver dev`: a ready-to-use local server for relay-only testing."""
    from turnserver.ops.config.values import ConfigError
    from turnserver.ops.dev.selfsigned import ensure_self_signed
    from turnserver.ops.process.app import serve

    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        ensure_self_signed(
            str(state / "cert.pem"), str(state / "key.pem"), ["localhost", args.host]
        )
        settings = dev_settings(args, state)
    except (ConfigError, ImpairmentError, OSError) as exc:
        print(f"turnserver dev: {exc}", file=sys.stderr)
        return 2

    def ready(server: RunningServer) -> None:
        summary = dev_summary(settings, server)
        if args.ready_file:
            tmp = f"{args.ready_file}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(summary, fh, indent=2)
            os.replace(tmp, args.ready_file)
        print_banner(settings, server.runtime, "dev", server.api_base)
        print(
            "  Developer mode: impair relayed media live, e.g. block UDP like a firewall:\n"
            f"    curl -X PUT -H 'X-API-Key: {summary['api_key']}' "
            f'-d \'{{"udp": "block"}}\' {summary["impairment_url"]}\n'
            f"  Files in {state}: {state_files(state)}\n",
            flush=True,
        )

    return serve(settings, on_ready=ready)
