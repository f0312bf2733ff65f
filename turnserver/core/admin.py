"""What an operator may do to live state (the admin API): end an allocation, revoke a
user until a time (their allocations end at once and every request of theirs gets 403
until then), and read an allocation as plain data. Revocations match Identity.user: a
static user's name, or the user part of a TURN REST username."""

from __future__ import annotations

from typing import Any

from turnserver.core.allocate import AllocationHandlers
from turnserver.core.allocation import Allocation
from turnserver.core.errors import Revoked
from turnserver.core.five_tuple import format_address
from turnserver.core.state import CoreState


class AdminActions:
    """Operator actions over the core's state."""

    def __init__(self, state: CoreState, allocating: AllocationHandlers) -> None:
        self.state = state
        self.allocating = allocating

    def check_revoked(self, user: str, wall: float) -> None:
        """Raise Revoked (403) while `user` is revoked (`wall`: Unix time); forget
        revocations that ended."""
        entry = self.state.revocations.get(user)
        if entry is None:
            return
        until, reason = entry
        if until <= wall:
            del self.state.revocations[user]
            return
        raise Revoked(f"user {user!r} is revoked until {int(until)}: {reason}"[:200])

    def end_allocation(self, allocation_id: str, cause: str, now: float) -> bool:
        """End one allocation now (its client's next request gets 437)."""
        alloc = self.state.allocations_by_id.get(allocation_id)
        if alloc is None:
            return False
        self.allocating.delete(alloc, now, cause)
        return True

    def revoke(self, user: str, until: float, reason: str, now: float) -> int:
        """Revoke a user until `until` (Unix time); returns how many live allocations
        ended."""
        self.state.revocations[user] = (until, reason)
        return self._end_user(user, now) if until > self.state.wall(now) else 0

    def unrevoke(self, user: str) -> bool:
        return self.state.revocations.pop(user, None) is not None

    def set_revocations(self, entries: dict[str, tuple[float, str]], now: float) -> int:
        """Replace every revocation (the file was re-read); ends the live allocations of
        users revoked now. Returns how many ended."""
        wall = self.state.wall(now)
        self.state.revocations = {u: e for u, e in entries.items() if e[0] > wall}
        return sum(self._end_user(user, now) for user in self.state.revocations)

    def _end_user(self, user: str, now: float) -> int:
        victims = [a for a in self.state.allocations.values() if a.user == user]
        for alloc in victims:
            self.allocating.delete(alloc, now, "revoked")
        return len(victims)

    def apply_bandwidth(self, rate: int, now: float) -> list[Allocation]:
        """A reloaded bandwidth limit (bytes a second, 0: none) for every live
        allocation at once; returns those whose limit changed."""
        changed = []
        for alloc in self.state.allocations.values():
            target = self.state.rate_for(alloc, rate)
            if alloc.rate != target:
                alloc.rate = target
                alloc.tokens = min(alloc.tokens, float(target)) if target else 0.0
                alloc.stamp = now
                changed.append(alloc)
        return changed

    def allocation_info(self, alloc: Allocation, now: float) -> dict[str, Any]:
        """One allocation as JSON-ready data; measures its rate since the last read."""
        moved = alloc.bytes_to_peer + alloc.bytes_to_client
        stamp, before = alloc.rate_sample
        elapsed = now - stamp
        rate = (moved - before) * 8 / elapsed if elapsed > 0 else 0.0
        if elapsed >= 1.0:
            alloc.rate_sample = (now, moved)
        ft = alloc.five_tuple
        return {
            "id": alloc.id,
            "user": alloc.user,
            "username": alloc.username,
            "realm": self.state.auth.realm,
            "tenant": alloc.tenant,
            "transport": ft.transport.value,
            "client": format_address(ft.client),
            "listener": format_address(ft.server),
            "relayed": [format_address(a) for a in alloc.relayed_addresses],
            "tcp_relay": alloc.is_tcp,
            "created": round(self.state.wall(alloc.created), 3),  # Unix times
            "expires": round(self.state.wall(alloc.expires), 3),
            "credential_expires": alloc.credential_expires,
            "permissions": [
                {"peer": ip, "expires": round(self.state.wall(exp), 3)}
                for ip, exp in alloc.permissions.items()
            ],
            "channels": [
                {
                    "number": f"0x{b.number:04x}",
                    "peer": format_address(b.peer),
                    "expires": round(self.state.wall(b.expires), 3),
                }
                for b in alloc.bindings.values()
            ],
            "peer_connections": len(alloc.peer_connections),
            "packets_to_peer": alloc.packets_to_peer,
            "bytes_to_peer": alloc.bytes_to_peer,
            "packets_to_client": alloc.packets_to_client,
            "bytes_to_client": alloc.bytes_to_client,
            "rate_bps": round(rate, 1),
        }
