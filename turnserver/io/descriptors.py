"""The file descriptor budget: how many sockets clients may make this process open.

Every socket a client causes (a TCP/TLS connection, a relay socket, an RFC 6062 peer
connection) is taken from one budget derived from RLIMIT_NOFILE, less a reserve for
listeners, the metrics/health and API listeners and their connections, logs and the
event loop. The core refuses with 508 and the I/O layer closes new connections when the
budget is spent, so the process never meets EMFILE in the middle of something.
"""

from __future__ import annotations

import resource

# Listeners, epoll, stdio, the metrics/health and API servers and a few dozen of their
# HTTP connections, shared memory, pipes to the parent: what is never a client's.
MIN_RESERVE = 128


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as systemd's LimitNOFILE
    intends); returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def reserve_for(nofile: int) -> int:
    """Descriptors kept back from clients: MIN_RESERVE or 5 %, whichever is more."""
    return max(MIN_RESERVE, nofile // 20)


def tighter(a: int, b: int) -> int:
    """The stricter of two limits where 0 means unlimited."""
    return min(a, b) if a and b else a or b


class DescriptorBudget:
    """Counts client-caused sockets against a limit (0: no limit)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @classmethod
    def from_rlimit(cls) -> DescriptorBudget:
        nofile = raise_nofile_limit()
        return cls(max(16, nofile - reserve_for(nofile)))

    def has(self, n: int = 1) -> bool:
        """True when n more descriptors fit."""
        return not self.limit or self.used + n <= self.limit

    def take(self, n: int = 1) -> None:
        self.used += n

    def give(self, n: int = 1) -> None:
        self.used = max(0, self.used - n)
