"""What is wrong with the TLS certificate we serve: expired, expiring within 14 days, or
not valid for the public host name clients use (`api.public_host`). A bad certificate
is a classic cause of "media connection failed" over TURN/TLS, and the self-probe cannot
see it (it trusts our own certificate), so these are checked separately."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from cryptography import x509

EXPIRY_WARNING = 14 * 86400


@dataclass
class CertificateStatus:
    """When the certificate expires and what is wrong with it (empty: nothing)."""

    not_after: float
    expired: bool
    problems: list[str] = field(default_factory=list)


def _covers(cert: x509.Certificate, host: str) -> bool:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in sans.get_values_for_type(x509.IPAddress)
    host = host.lower().rstrip(".")
    for name in sans.get_values_for_type(x509.DNSName):
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


class CertificateCheck:
    """Re-reads the certificate only when the file changes."""

    def __init__(self, cert_file: str, public_host: str | None) -> None:
        self.cert_file = cert_file
        self.public_host = public_host
        self._mtime = -1.0
        self._cert: x509.Certificate | None = None
        self._error = ""

    def _load(self) -> None:
        try:
            mtime = os.stat(self.cert_file).st_mtime
        except OSError as exc:
            self._cert, self._error = None, f"cannot read {self.cert_file}: {exc.strerror}"
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            with open(self.cert_file, "rb") as fh:
                self._cert, self._error = x509.load_pem_x509_certificate(fh.read()), ""
        except (OSError, ValueError) as exc:
            self._cert, self._error = None, f"cannot parse {self.cert_file}: {exc}"

    def status(self, now: float) -> CertificateStatus:
        self._load()
        cert = self._cert
        if cert is None:
            return CertificateStatus(0.0, True, [self._error])
        not_after = cert.not_valid_after_utc.timestamp()
        problems = []
        expired = not_after <= now
        if expired:
            problems.append(f"the certificate {self.cert_file} has expired")
        elif not_after - now < EXPIRY_WARNING:
            days = (not_after - now) / 86400
            problems.append(f"the certificate {self.cert_file} expires in {days:.1f} days")
        if self.public_host and not _covers(cert, self.public_host):
            problems.append(
                f"the certificate {self.cert_file} does not cover api.public_host "
                f"{self.public_host!r}: clients using that name will refuse it"
            )
        return CertificateStatus(not_after, expired, problems)
