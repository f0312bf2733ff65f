"""Peer policy: which peer addresses an allocation may relay to (RFC 8656 §21.2.3).

Denied by default: loopback, unspecified, private, CGNAT, link-local, unique-local,
multicast, reserved, benchmark and documentation ranges and NAT64, in every IPv6
form that embeds an IPv4 address (mapped, compatible, 6to4 is left alone).
An allow list wins over everything; a deny list adds to the defaults.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

DEFAULT_DENIED_NETWORKS: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network", incl. 0.0.0.0 (CVE-2020-26262)
    "10.0.0.0/8",
    "100.64.0.0/10",  # CGNAT
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, cloud metadata
    "172.16.0.0/12",
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # TEST-NET-1
    "192.88.99.0/24",  # 6to4 relay anycast
    "192.168.0.0/16",
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # TEST-NET-2
    "203.0.113.0/24",  # TEST-NET-3
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, incl. broadcast
    "::/128",
    "::1/128",
    "64:ff9b::/96",  # NAT64
    "64:ff9b:1::/48",  # local-use NAT64
    "100::/64",  # discard-only
    "2001:db8::/32",  # documentation
    "2001:2::/48",  # benchmarking
    "fc00::/7",  # unique-local
    "fe80::/10",  # link-local
    "fec0::/10",  # deprecated site-local
    "ff00::/8",  # multicast
)


class PeerPolicy(Protocol):
    """Decides whether a peer IP may be relayed to."""

    def is_allowed(self, ip: IPAddress) -> bool: ...


def canonical_ip(ip: IPAddress) -> IPAddress:
    """Unwrap IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d) addresses."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
        packed = ip.packed
        if packed[:12] == bytes(12) and int(ip) > 1:
            return ipaddress.IPv4Address(packed[12:])
    return ip


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings; raise ValueError naming the bad one."""
    out: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"not an IP network: {cidr!r}") from exc
    return tuple(out)


def _ranges(networks: Iterable[IPNetwork]) -> dict[int, tuple[tuple[int, int], ...]]:
    """Networks as integer ranges per IP version: containment is two comparisons."""
    out: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for net in networks:
        out[net.version].append((int(net.network_address), int(net.broadcast_address)))
    return {v: tuple(r) for v, r in out.items()}


def _contains(ranges: dict[int, tuple[tuple[int, int], ...]], ip: IPAddress) -> bool:
    value = int(ip)
    return any(lo <= value <= hi for lo, hi in ranges[ip.version])


class DefaultPeerPolicy:
    """The default-deny policy with configurable allow and deny lists."""

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        allow_loopback: bool = False,
    ) -> None:
        self.allow = parse_networks(allow)
        self.deny = parse_networks(DEFAULT_DENIED_NETWORKS) + parse_networks(deny)
        loopback = parse_networks(LOOPBACK_NETWORKS) if allow_loopback else ()
        self._allow = _ranges((*self.allow, *loopback))
        self._deny = _ranges(self.deny)

    def is_allowed(self, ip: IPAddress) -> bool:
        """Canonicalize first so ::ffff:127.0.0.1 is judged as 127.0.0.1."""
        ip = canonical_ip(ip)
        if _contains(self._allow, ip):
            return True
        return not _contains(self._deny, ip)
