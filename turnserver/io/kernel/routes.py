"""Where the kernel would send a packet: one RTM_GETROUTE question over rtnetlink (the
question `ip route get ADDRESS` asks), for the kernel fast path's next hop. Standard
library only: a netlink socket and three structs.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, ..., type, flags
_RTA = struct.Struct("=HH")  # rtattr: length, type
_RTM_NEWROUTE, _RTM_GETROUTE, _NLMSG_ERROR = 24, 26, 2
_NLM_F_REQUEST = 1
_RTA_DST, _RTA_OIF = 1, 4
_RTN_UNICAST, _RTN_LOCAL = 1, 2
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772  # link types that carry an Ethernet header at tc


class RouteLookup:
    """`ip route get` for IPv4 and IPv6 destinations, answered by the kernel."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.settimeout(1.0)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def next_hop(self, ip: str) -> int | None:
        """0 when `ip` is an address of this host, the index of the interface the route
        leaves through when it is reachable by unicast, None otherwise (no route, a
        blackhole, broadcast or multicast, not an address)."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            dst = socket.inet_pton(family, ip)
        except OSError:
            return None
        self._seq += 1
        body = _RTMSG.pack(family, 8 * len(dst), 0, 0, 0, 0, 0, 0, 0)
        body += _RTA.pack(_RTA.size + len(dst), _RTA_DST) + dst
        self._sock.send(
            _NLMSG.pack(_NLMSG.size + len(body), _RTM_GETROUTE, _NLM_F_REQUEST, self._seq, 0) + body
        )
        try:
            while True:
                reply = self._sock.recv(65536)
                length, kind, _, seq, _ = _NLMSG.unpack_from(reply)
                if seq == self._seq:
                    break
        except OSError:
            return None
        if kind != _RTM_NEWROUTE:  # NLMSG_ERROR: unreachable, prohibited, ...
            return None
        route_type = _RTMSG.unpack_from(reply, _NLMSG.size)[7]
        if route_type == _RTN_LOCAL:
            return 0
        if route_type != _RTN_UNICAST:
            return None
        at = _NLMSG.size + _RTMSG.size
        while at + _RTA.size <= min(length, len(reply)):
            size, kind = _RTA.unpack_from(reply, at)
            if size < _RTA.size:
                break
            if kind == _RTA_OIF:
                oif: int = struct.unpack_from("=I", reply, at + _RTA.size)[0]
                return oif
            at += (size + 3) & ~3
        return None


def link_type(name: str) -> int:
    """The interface's ARPHRD_* type (/sys/class/net/NAME/type), -1 when unknown."""
    try:
        return int(Path("/sys/class/net", name, "type").read_text())
    except (OSError, ValueError):
        return -1


def link_is_up(name: str) -> bool:
    try:
        flags = int(Path("/sys/class/net", name, "flags").read_text(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & 1)  # IFF_UP


def ethernet_links() -> list[tuple[int, str]]:
    """Interfaces that are up and whose packets reach tc with an Ethernet header
    (Ethernet, veth, bridges, loopback); tunnels (no link-layer header) are left out."""
    out = []
    for index, name in socket.if_nameindex():
        if link_type(name) in (ARPHRD_ETHER, ARPHRD_LOOPBACK) and link_is_up(name):
            out.append((index, name))
    return out


__all__ = ["RouteLookup", "ethernet_links", "link_type"]
