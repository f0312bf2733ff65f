"""SIGHUP: certificates, secrets and config reload without dropping live allocations."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import time
from pathlib import Path

import pytest
from aioice import turn
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support import WORKER_COUNTS, Collector, eventually
from tests.support.procs import ServerProcess, free_port, turnserver_process
from tests.support.server import EchoProtocol
from turnserver.ops.dev.selfsigned import ensure_self_signed
from turnserver.ops.http.credentials import mint


def _config(path: Path, secret: str, cert: str, key: str) -> None:
    path.write_text(
        f"realm: reload.test\nauth:\n  secrets: [{secret}]\n"
        f"tls:\n  cert: {cert}\n  key: {key}\n"
        "peers:\n  allow_loopback: true\nrelay:\n  ip: [127.0.0.1]\n"
        "  min_port: 36000\n  max_port: 36199\nlog:\n  level: info\n"
    )


async def _served_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


def _der(cert_file: str) -> bytes:
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


async def _allocates(server: ServerProcess, secret: str, user: str) -> bool:
    cred = mint(secret, user, 600, time.time())
    try:
        transport, _ = await asyncio.wait_for(
            turn.create_turn_endpoint(
                Collector,
                server_addr=("127.0.0.1", server.port),
                username=cred.username,
                password=cred.password,
            ),
            10,
        )
    except Exception as exc:  # aioice raises TransactionFailed carrying the 401
        assert "401" in str(exc)
        return False
    transport.close()
    return True


async def _hup(server: ServerProcess, expect: str, processes: int) -> None:
    """SIGHUP, then wait until each of the server's processes logged `expect`."""
    before = server.log().count(expect)
    server.proc.send_signal(signal.SIGHUP)
    await eventually(
        lambda: server.log().count(expect) >= before + processes,
        10,
        what=f"{expect!r} after SIGHUP: {server.log()[-2000:]}",
    )


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_sighup_reloads_without_dropping_allocations(
    tmp_path: Path, echo_peer: tuple[tuple[str, int], EchoProtocol], workers: int | None
) -> None:
    processes = workers or os.cpu_count() or 1
    cert_a, key_a = str(tmp_path / "a.pem"), str(tmp_path / "a.key")
    cert_b, key_b = str(tmp_path / "b.pem"), str(tmp_path / "b.key")
    ensure_self_signed(cert_a, key_a, ["localhost"])
    ensure_self_signed(cert_b, key_b, ["localhost"])
    cfg = tmp_path / "turnserver.yaml"
    _config(cfg, "secret-a", cert_a, key_a)
    tls_port = free_port()
    with turnserver_process(
        tmp_path, "--config", str(cfg), streams=True, tls_port=tls_port, workers=workers
    ) as server:
        assert await _served_cert(tls_port) == _der(cert_a)
        # A live allocation over TLS that must survive every reload below
        ctx = ssl.create_default_context(cafile=cert_a)
        ctx.check_hostname = False
        cred = mint("secret-a", "live", 600, time.time())
        live, proto = await turn.create_turn_endpoint(
            Collector,
            server_addr=("127.0.0.1", tls_port),
            username=cred.username,
            password=cred.password,
            transport="tcp",
            ssl=ctx,
        )
        try:
            live.sendto(b"before", echo_peer[0])
            assert await asyncio.wait_for(proto.queue.get(), 3) == b"before"

            _config(cfg, "secret-b", cert_b, key_b)
            await _hup(server, "configuration reloaded", processes)
            assert await _served_cert(tls_port) == _der(cert_b)
            assert not await _allocates(server, "secret-a", "rotated-out")
            assert await _allocates(server, "secret-b", "rotated-in")
            assert re.search(r"reason=bad_credentials", server.log())

            Path(cert_a).write_text("not a certificate")
            _config(cfg, "secret-b", cert_a, key_a)
            await _hup(server, "certificate reload failed", processes)
            assert await _served_cert(tls_port) == _der(cert_b)

            cfg.write_text("realm: [broken\n")
            await _hup(server, "configuration rejected", processes)
            assert await _allocates(server, "secret-b", "still-fine")

            live.sendto(b"after", echo_peer[0])
            assert await asyncio.wait_for(proto.queue.get(), 3) == b"after"
        finally:
            live.close()
        assert "Traceback" not in server.log()
