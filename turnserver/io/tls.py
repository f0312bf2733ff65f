"""TLS server contexts: TLS 1.2/1.3 only, ALPN "stun.turn", reloadable certificates.

Listeners keep one base context whose SNI callback hands every new handshake the
current context, so a reload swaps certificates for new connections while existing
ones continue untouched.
"""

from __future__ import annotations

import ssl

ALPN_PROTOCOLS = ["stun.turn"]  # RFC 7443


def build_context(
    cert_file: str, key_file: str, alpn: list[str] | None = ALPN_PROTOCOLS
) -> ssl.SSLContext:
    """A server context with the stdlib's default ciphers; raises ssl.SSLError/OSError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if alpn:
        ctx.set_alpn_protocols(alpn)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class ReloadableTLS:
    """Holds the current certificate; listeners use `listener_context`."""

    def __init__(
        self, cert_file: str, key_file: str, alpn: list[str] | None = ALPN_PROTOCOLS
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.alpn = alpn
        self.current = build_context(cert_file, key_file, alpn)
        self.listener_context = build_context(cert_file, key_file, alpn)
        self.listener_context.sni_callback = self._select

    def _select(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext
    ) -> int | None:
        sslobj.context = self.current
        return None

    def reload(self, cert_file: str | None = None, key_file: str | None = None) -> None:
        """Load the (possibly new) files; on error keep the old certificate and raise."""
        cert = cert_file or self.cert_file
        key = key_file or self.key_file
        self.current = build_context(cert, key, self.alpn)
        self.cert_file, self.key_file = cert, key
