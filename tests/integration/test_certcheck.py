"""The TLS certificate check behind /readyz, the expiry metric and the log warnings."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.support.server import RunningServer
from turnserver.ops.dev.selfsigned import make_certificate
from turnserver.ops.telemetry.certcheck import CertificateCheck


def _cert(path: Path, names: list[str], not_after: datetime.datetime) -> str:
    cert, _ = make_certificate(names, not_after)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def test_expired_expiring_and_wrong_name(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expired = _cert(tmp_path / "old.pem", ["turn.example.com"], now - datetime.timedelta(days=1))
    soon = _cert(tmp_path / "soon.pem", ["*.example.com"], now + datetime.timedelta(days=3))
    good = _cert(tmp_path / "good.pem", ["turn.example.com"], now + datetime.timedelta(days=90))
    status = CertificateCheck(expired, "turn.example.com").status(time.time())
    assert status.expired and "has expired" in status.problems[0]
    status = CertificateCheck(soon, "turn.example.com").status(time.time())
    assert not status.expired and "expires in 3.0 days" in status.problems[0]
    assert len(status.problems) == 1  # the wildcard covers turn.example.com
    status = CertificateCheck(good, "other.example.org").status(time.time())
    assert "does not cover api.public_host 'other.example.org'" in status.problems[0]
    assert CertificateCheck(good, "turn.example.com").status(time.time()).problems == []


@pytest.mark.server_settings(public_host="turn.example.net")
async def test_readyz_warns_about_the_certificate(server: RunningServer) -> None:
    ok, body = server.server.health.readiness()
    cert = body["checks"]["certificate"]
    assert ok and cert["ok"]  # a warning, not a failure: only an expired one fails
    assert any("does not cover api.public_host" in w for w in cert["warnings"])
    value = server.server.metrics.registry.get_sample_value(
        "turn_tls_certificate_expiry_timestamp_seconds"
    )
    assert value is not None and value > time.time()
