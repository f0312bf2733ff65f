"""Peer policy: which peer addresses an allocation may relay to (RFC 8656 §21.2.3).

Denied by default: loopback, unspecified, private, CGNAT, link-local, unique-local,
multicast, reserved, benchmark and documentation ranges and NAT64; an IPv6 address
that embeds an IPv4 address (IPv4-mapped, -compatible and -translated, 6to4, both
Teredo fields, NAT64) is denied when the IPv4 address it carries would be.
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
    "3fff::/20",  # documentation (RFC 9637)
    "2001:2::/48",  # benchmarking
    "fc00::/7",  # unique-local
    "fe80::/10",  # link-local
    "fec0::/10",  # deprecated site-local
    "ff00::/8",  # multicast
)

_6TO4 = ipaddress.IPv6Network("2002::/16")  # RFC 3056: 2002:AABB:CCDD::/48
_TEREDO = ipaddress.IPv6Network("2001::/32")  # RFC 4380: server, ~client in the low bits
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 IPv4-translated
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052


class PeerPolicy(Protocol):
    """Decides whether a peer IP may be relayed to."""

    def is_allowed(self, ip: IPAddress) -> bool: ...

    def explicitly_allowed(self, ip: IPAddress) -> bool:
        """Named by an allow entry (peers.allow): the operator's choice, which even an
        address of this host's own may take."""
        ...


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


def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries and a relay could end up reaching:
    IPv4-translated, 6to4, Teredo (server and client), NAT64."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return ()
    packed = ip.packed
    if ip in _TRANSLATED or ip in _NAT64:
        return (ipaddress.IPv4Address(packed[12:]),)
    if ip in _6TO4:
        return (ipaddress.IPv4Address(packed[2:6]),)
    if ip in _TEREDO:
        client = bytes(b ^ 0xFF for b in packed[12:])
        return ipaddress.IPv4Address(packed[4:8]), ipaddress.IPv4Address(client)
    return ()


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
        self._explicit = _ranges(self.allow)
        self._deny = _ranges(self.deny)

    def is_allowed(self, ip: IPAddress) -> bool:
        """Canonicalize first so ::ffff:127.0.0.1 is judged as 127.0.0.1; an address that
        carries an IPv4 address is judged by it too."""
        ip = canonical_ip(ip)
        if _contains(self._allow, ip):
            return True
        if _contains(self._deny, ip):
            return False
        return all(self.is_allowed(v4) for v4 in embedded_ipv4(ip))

    def explicitly_allowed(self, ip: IPAddress) -> bool:
        return _contains(self._explicit, canonical_ip(ip))
