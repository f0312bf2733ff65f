"""Self-signed certificates for local development (`make run` serves TLS with one)."""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def spki_sha256(cert_file: str) -> str:
    """base64(SHA-256(SPKI)): the hash Chromium takes in --ignore-certificate-errors-spki-list."""
    with open(cert_file, "rb") as fh:
        cert = x509.load_pem_x509_certificate(fh.read())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def make_certificate(
    hosts: list[str], not_after: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed certificate for the hosts (DNS names or IPs) and its new key."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    not_before = min(not_after, datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def ensure_self_signed(
    cert_file: str, key_file: str, hosts: list[str], days: int = 365
) -> tuple[bool, str]:
    """Create cert and key unless both exist; return (created, SHA-256 fingerprint)."""
    created = False
    if not (os.path.exists(cert_file) and os.path.exists(key_file)):
        now = datetime.datetime.now(datetime.UTC)
        cert, key = make_certificate(hosts, now + datetime.timedelta(days=days))
        for path in (cert_file, key_file):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        with open(cert_file, "wb") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        created = True
    with open(cert_file, "rb") as fh:
        cert_obj = x509.load_pem_x509_certificate(fh.read())
    return created, cert_obj.fingerprint(hashes.SHA256()).hex(":")


def selfsigned_command(args: argparse.Namespace) -> int:
    """`turnserver selfsigned`: make (or keep) a certificate for local TLS."""
    created, fingerprint = ensure_self_signed(
        args.cert, args.key, args.host or ["localhost", "127.0.0.1", "::1"], args.days
    )
    state = "created" if created else "kept existing"
    print(f"{state} {args.cert} (SHA-256 {fingerprint})")
    return 0
