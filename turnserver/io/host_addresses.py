"""Every address of this host, learned from the kernel and kept current: an RTM_GETADDR
dump over rtnetlink at start, then the kernel's address notifications (RTM_NEWADDR,
RTM_DELADDR, the groups `ip monitor address` listens to) as they come, read by the
event loop. The core never relays to them (core/own_addresses.py). Standard library
only; where rtnetlink is not available the listener and relay addresses stand in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("turnserver")

_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTA = struct.Struct("=HH")  # rtattr: length, type
_RTM_NEWADDR, _RTM_DELADDR, _RTM_GETADDR = 20, 21, 22
_NLMSG_DONE, _NLMSG_ERROR = 3, 2
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_RTMGRP_IPV4_IFADDR, _RTMGRP_IPV6_IFADDR = 0x10, 0x100


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_address_messages(data: bytes) -> list[tuple[bool, str]]:
    """(added, address) for each RTM_NEWADDR / RTM_DELADDR in a netlink datagram."""
    out: list[tuple[bool, str]] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            break
        if kind in (_RTM_NEWADDR, _RTM_DELADDR) and length >= _NLMSG.size + _IFADDRMSG.size:
            family = _IFADDRMSG.unpack_from(data, offset + _NLMSG.size)[0]
            attrs: dict[int, bytes] = {}
            at = offset + _NLMSG.size + _IFADDRMSG.size
            end = offset + length
            while at + _RTA.size <= end:
                rta_len, rta_type = _RTA.unpack_from(data, at)
                if rta_len < _RTA.size or at + rta_len > end:
                    break
                attrs[rta_type] = data[at + _RTA.size : at + rta_len]
                at += _align(rta_len)
            # IFA_LOCAL is the local address of point-to-point links, IFA_ADDRESS the peer
            raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
            if raw is not None and (family, len(raw)) in (
                (socket.AF_INET, 4),
                (socket.AF_INET6, 16),
            ):
                out.append((kind == _RTM_NEWADDR, str(ipaddress.ip_address(raw))))
        offset += _align(length)
    return out


class HostAddresses:
    """The host's addresses, with a callback when they change."""

    def __init__(self, fallback: set[str]) -> None:
        self.fallback = set(fallback)
        self.addresses: set[str] = set(fallback)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_change: Callable[[frozenset[str]], None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> frozenset[str]:
        """Dump the addresses now and follow their changes; returns them."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.addresses |= self._dump(sock)
            sock.setblocking(False)
        except OSError as exc:
            log.warning(
                "cannot read this host's addresses from the kernel (%s): only the listener "
                "and relay addresses are known as its own",
                exc.strerror or exc,
            )
            return frozenset(self.addresses)
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)
        return frozenset(self.addresses)

    @staticmethod
    def _dump(sock: socket.socket) -> set[str]:
        request = _NLMSG.pack(
            _NLMSG.size + _IFADDRMSG.size, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        ) + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.settimeout(2.0)
        sock.send(request)
        found: set[str] = set()
        while True:
            data = sock.recv(1 << 16)
            for added, address in parse_address_messages(data):
                if added:
                    found.add(address)
            kinds = []
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
                kinds.append(kind)
                if length < _NLMSG.size:
                    break
                offset += _align(length)
            if _NLMSG_DONE in kinds or _NLMSG_ERROR in kinds or not data:
                return found

    def _readable(self) -> None:
        sock = self._sock
        assert sock is not None
        changed = False
        for _ in range(64):
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: notifications were lost, read them all again
                log.warning("host addresses: %s; reading them again", exc.strerror or exc)
                try:
                    sock.setblocking(True)
                    self.addresses = self._dump(sock) | self.fallback
                except OSError:
                    pass
                finally:
                    sock.setblocking(False)
                changed = True
                break
            for added, address in parse_address_messages(data):
                if added and address not in self.addresses:
                    self.addresses.add(address)
                    changed = True
                elif not added and address in self.addresses:
                    self.addresses.discard(address)
                    changed = True
        if changed and self.on_change is not None:
            self.on_change(frozenset(self.addresses))

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
