"""Who may hold a TCP/TLS client connection, and for how long.

Caps in all, per client address and by file descriptors; the TLS handshake rate per
source; on PROXY listeners (io/proxy_protocol.py) trust by source and the header's
deadline; then the deadlines that close a connection (idle without an allocation, a
frame left unfinished, no successful request yet, a write buffer that stays full).
Refusals are counted by reason (turn_stream_connections_refused_total).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from turnserver.core import events as ev
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.policy import IPNetwork
from turnserver.core.ratelimit import TokenBuckets
from turnserver.io.descriptors import DescriptorBudget
from turnserver.io.impairment import Impairments
from turnserver.io.runtime_view import ClientStream

if TYPE_CHECKING:
    from turnserver.io.stream import StreamConnection

log = logging.getLogger("turnserver")
LOG_INTERVAL = 60.0
STREAM_CAPS = ("stream_limit", "per_ip_limit", "fd_limit", "tls_rate_limited")
PROXY_REFUSALS = {
    "proxy_untrusted": "not a trusted proxy (stream.proxy_trusted)",
    "proxy_header_invalid": "bad PROXY header",
    "proxy_header_timeout": "no PROXY header in time",
}


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """Limits for TCP/TLS client connections."""

    idle_timeout: float = 30.0  # a connection with no allocation and no traffic
    handshake_timeout: float = 10.0  # TLS
    backlog: int = 1024
    frame_timeout: float = 10.0  # to finish a STUN message or ChannelData frame once begun
    first_request_timeout: float = 15.0  # to get a first successful answer (slowloris)
    write_timeout: float = 30.0  # a client that stops reading is closed after this
    max_connections: int = 0  # TCP/TLS client connections in all (0: half the fd budget)
    max_connections_per_ip: int = 256  # from one client IP address (0: no cap)
    # TLS handshakes a second from one client IP past a burst (a handshake costs the
    # server 0.5-0.7 ms of CPU, a replayed ClientHello its sender almost nothing)
    tls_handshake_rate: float = 50.0
    tls_handshake_burst: int = 200
    # PROXY protocol listeners (io/proxy_protocol.py): the only sources they accept,
    # and how long a trusted proxy has to send the header
    proxy_trusted: tuple[IPNetwork, ...] = ()
    proxy_header_timeout: float = 5.0


class AdmissionRuntime(Protocol):
    """What admission needs of the runtime (io/runtime.py)."""

    loop: asyncio.AbstractEventLoop
    stream_options: StreamOptions
    descriptors: DescriptorBudget
    impairments: Impairments | None

    @property
    def stream_limit(self) -> int: ...

    def emit(self, event: ev.Event) -> None: ...


class StreamAdmission:
    """The table of TCP/TLS client connections of one process, and its rules."""

    def __init__(self, runtime: AdmissionRuntime) -> None:
        self.runtime = runtime
        self.connections: dict[FiveTuple, StreamConnection] = {}
        self.per_ip: dict[str, int] = {}
        self.refusals: dict[str, int] = {}  # reason -> connections refused
        self.proxy_pending: set[StreamConnection] = set()  # PROXY header not read yet
        self.last_cap_hit = 0.0  # loop time a cap last refused a connection
        self._tls_handshakes = TokenBuckets(50.0, 200)
        self._logged: dict[str, float] = {}  # PROXY refusal reason -> last logged

    def opened(self, conn: ClientStream) -> bool:
        """Admit a new TCP/TLS connection, or refuse it (counted) over a cap."""
        runtime = self.runtime
        ft = conn.five_tuple
        assert ft is not None
        ip = ft.client[0]
        per_ip = self.per_ip.get(ip, 0)
        cap_per_ip = runtime.stream_options.max_connections_per_ip
        refused = ""
        if len(self.connections) >= runtime.stream_limit > 0:
            refused = "stream_limit"
        elif cap_per_ip and per_ip >= cap_per_ip:
            refused = "per_ip_limit"
        elif not runtime.descriptors.has(1):
            refused = "fd_limit"
        if refused:
            self.last_cap_hit = runtime.loop.time()
        elif ft.transport == ClientTransport.TLS and not self._tls_handshake_allowed(ip):
            refused = "tls_rate_limited"
        elif runtime.impairments is not None and runtime.impairments.blocked(ft.transport.value):
            refused = "dev_block"  # developer mode: a firewall, not a cap
        if refused:
            self.refusals[refused] = self.refusals.get(refused, 0) + 1
            runtime.emit(ev.ConnectionClosed(ft, refused, ""))
            return False
        runtime.descriptors.take(1)
        self.per_ip[ip] = per_ip + 1
        self.connections[ft] = cast("StreamConnection", conn)  # the only kind we make
        return True

    def closed(self, conn: ClientStream) -> bool:
        """Forget a connection; False if it was never admitted."""
        ft = conn.five_tuple
        if ft is None or self.connections.get(ft) is not conn:
            return False
        del self.connections[ft]
        self.runtime.descriptors.give(1)
        ip = ft.client[0]
        left = self.per_ip.get(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)
        return True

    def _tls_handshake_allowed(self, ip: str) -> bool:
        """Token bucket per client address for TLS handshakes (stream.tls_handshake_*)."""
        o = self.runtime.stream_options
        buckets = self._tls_handshakes
        buckets.rate, buckets.burst = o.tls_handshake_rate, o.tls_handshake_burst
        return not o.tls_handshake_rate or buckets.allow(ip, self.runtime.loop.time())

    # ---- PROXY listeners --------------------------------------------------------------

    def proxy_admit(self, conn: ClientStream) -> bool:
        """A connection to a PROXY listener: only from trusted proxies, held under the
        same caps as a client's until its header comes."""
        runtime = self.runtime
        ft = conn.five_tuple
        assert ft is not None
        refused = ""
        if not _in_networks(ft.client[0], runtime.stream_options.proxy_trusted):
            refused = "proxy_untrusted"
        elif len(self.connections) + len(self.proxy_pending) >= runtime.stream_limit > 0:
            refused = "stream_limit"
        elif not runtime.descriptors.has(1):
            refused = "fd_limit"
        if refused:
            self._proxy_refused(ft, refused, "")
            return False
        runtime.descriptors.take(1)
        self.proxy_pending.add(cast("StreamConnection", conn))
        return True

    def proxy_release(self, conn: ClientStream, refused: str = "", detail: str = "") -> bool:
        """The header came (its client is now conn.five_tuple), or the wait ended."""
        self.proxy_pending.discard(cast("StreamConnection", conn))
        self.runtime.descriptors.give(1)  # opened() takes it again for the client
        ft = conn.five_tuple
        assert ft is not None
        if refused.startswith("proxy_"):
            self._proxy_refused(ft, refused, detail)
            return False
        if not refused and ft in self.connections:
            self._proxy_refused(ft, "proxy_header_invalid", "a client already connected")
            return False
        return not refused

    def _proxy_refused(self, ft: FiveTuple, reason: str, detail: str) -> None:
        """Counted always; logged once a minute per reason (an untrusted scanner must not
        fill the log)."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        if reason in ("stream_limit", "fd_limit"):
            self.last_cap_hit = self.runtime.loop.time()
        now = self.runtime.loop.time()
        if now - self._logged.get(reason, -LOG_INTERVAL) >= LOG_INTERVAL:
            self._logged[reason] = now
            log.warning(
                "PROXY listener %s:%s refused a connection from %s:%s: %s%s "
                "(logged once a minute; turn_stream_connections_refused_total counts all)",
                ft.server[0],
                ft.server[1],
                ft.client[0],
                ft.client[1],
                PROXY_REFUSALS.get(reason, reason.replace("_", " ")),
                f" ({detail!r})" if detail else "",
            )

    # ---- deadlines ------------------------------------------------------------------

    def shortest_deadline(self) -> float:
        o = self.runtime.stream_options
        return min(
            o.idle_timeout,
            o.frame_timeout,
            o.first_request_timeout,
            o.write_timeout,
            o.proxy_header_timeout,
        )

    def sweep(self, now: float) -> None:
        """Close connections past a deadline."""
        o = self.runtime.stream_options
        idle_before = now - o.idle_timeout
        frame_before = now - o.frame_timeout
        first_before = now - o.first_request_timeout
        write_before = now - o.write_timeout
        proxy_before = now - o.proxy_header_timeout
        for conn in list(self.proxy_pending):
            if conn.opened_at < proxy_before:
                why = f"no PROXY header in {o.proxy_header_timeout:g} s"
                conn.close("proxy_header_timeout", why)
        for conn in list(self.connections.values()):
            if conn.closing:
                continue
            if conn.paused_since and conn.paused_since < write_before:
                conn.close("write_timeout", "the client does not read its responses")
            elif conn.pipe is not None:
                continue  # RFC 6062 data connection: raw bytes, the peer decides
            elif conn.frame_started and conn.frame_started < frame_before:
                conn.close("frame_timeout", f"frame unfinished after {o.frame_timeout:g} s")
            elif not conn.answered and conn.opened_at < first_before:
                conn.close("first_request_timeout", "no successful request")
            elif conn.alloc is None and conn.last_active < idle_before:
                conn.close("idle_timeout", f"no allocation and idle {now - conn.last_active:.0f} s")


def _in_networks(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack listener sees IPv4 proxies this way
    return any(addr in net for net in networks)
