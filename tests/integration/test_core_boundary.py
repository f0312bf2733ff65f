"""Nothing a client sends escapes the protocol core: what would (a bug)
is caught at the adapters' boundary, counted in turn_internal_errors_total and logged
once a minute with its traceback, never once a packet; JSON logs stay JSON."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from tests.support import eventually
from tests.support.procs import free_port, loopback_args, turnserver_process
from tests.support.server import SECRET, RunningServer
from turnserver.client.turnclient import TurnClient
from turnserver.ops.http.credentials import mint
from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_message


async def test_an_exception_in_the_core_is_counted_and_logged_once(
    server: RunningServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = server.runtime.core
    real = core.handle_message

    def broken(data: bytes, ft: object, now: float) -> bytes | None:
        if data[:2] == b"\x00\x01" and b"boom" in data:
            raise ValueError("a bug in the core")
        return real(data, ft, now)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "handle_message", broken)
    caplog.set_level(logging.ERROR, logger="turnserver")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(100):
            req = encode_message(
                Method.BINDING, MessageClass.REQUEST, os.urandom(12), [(Attr.SOFTWARE, "boom")]
            )
            s.sendto(req, server.address)
    await eventually(lambda: server.runtime.internal_errors == {"udp": 100}, 5)
    errors = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None
    # the server goes on: TCP and UDP clients still allocate
    cred = mint(SECRET, "after-bug", 600, time.time())
    for transport in ("udp", "tcp"):
        c = await TurnClient.connect(
            transport, server.address_of(transport), cred.username, cred.password
        )
        await c.allocate()
        c.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_unicode_digit_usernames_get_401_and_json_logs_stay_json(tmp_path: Path) -> None:
    """A packet that could raise ValueError out of a core with a bug: 92 bytes with a USERNAME
    of '²'. 200 of them: each answered 401 (or dropped by the 401 rate limit), every log
    line JSON."""
    lo = 23000 + os.getpid() % 500
    with turnserver_process(
        tmp_path,
        *loopback_args(SECRET, lo, lo + 99),
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--probe-interval",
        "0",
    ) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            answers = 0
            for _ in range(200):
                req = encode_message(
                    Method.ALLOCATE,
                    MessageClass.REQUEST,
                    os.urandom(12),
                    [
                        (Attr.REQUESTED_TRANSPORT, 17),
                        (Attr.USERNAME, "²"),
                        (Attr.REALM, "turnserver"),
                        (Attr.NONCE, "x" * 24),
                    ],
                    integrity_key=b"k" * 16,
                )
                s.sendto(req, ("127.0.0.1", server.port))
                resp = decode_message(s.recvfrom(2048)[0])
                answers += resp.get(Attr.ERROR_CODE)[0] in (401, 438)
        assert answers == 200
        free_port()  # (keeps the server busy for a moment: its last lines are flushed)
        lines = server.log().splitlines()
        assert lines and all(json.loads(line) for line in lines if line.strip())
        assert "Traceback" not in server.log() and "internal error" not in server.log()
