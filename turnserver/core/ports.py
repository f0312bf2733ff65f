"""Relay port pool: which ports of the configured range are free (RFC 8656 §7.2).

Ports are handed out at random (RFC 8656 §7.2 recommends unpredictable ports);
EVEN-PORT asks for an even port, optionally holding port+1 for a later Allocate
that presents the RESERVATION-TOKEN.
"""

from __future__ import annotations

import os


class RelayPortPool:
    """Free ports of one relay address, O(1) take and give back."""

    def __init__(self, min_port: int, max_port: int) -> None:
        if not 0 < min_port <= max_port <= 65535:
            raise ValueError(f"bad relay port range {min_port}-{max_port}")
        self.min_port = min_port
        self.max_port = max_port
        self._free: list[int] = list(range(min_port, max_port + 1))
        self._index: dict[int, int] = {p: i for i, p in enumerate(self._free)}

    def __len__(self) -> int:
        return len(self._free)

    @property
    def size(self) -> int:
        return self.max_port - self.min_port + 1

    def is_free(self, port: int) -> bool:
        return port in self._index

    def take(self, port: int) -> bool:
        """Remove a specific port from the pool; False when it is not free."""
        i = self._index.pop(port, None)
        if i is None:
            return False
        last = self._free.pop()
        if last != port:
            self._free[i] = last
            self._index[last] = i
        return True

    def take_random(self) -> int | None:
        """Any free port, or None when the range is exhausted."""
        if not self._free:
            return None
        port = self._free[_random_below(len(self._free))]
        self.take(port)
        return port

    def take_even(self, reserve_next: bool) -> int | None:
        """A free even port (and port+1 too when reserve_next), or None."""
        free = self._free
        for _ in range(min(64, len(free))):
            port = free[_random_below(len(free))] & ~1
            if self._even_fits(port, reserve_next):
                self.take(port)
                if reserve_next:
                    self.take(port + 1)
                return port
        for port in sorted(p for p in free if p % 2 == 0):
            if self._even_fits(port, reserve_next):
                self.take(port)
                if reserve_next:
                    self.take(port + 1)
                return port
        return None

    def _even_fits(self, port: int, reserve_next: bool) -> bool:
        return port in self._index and (not reserve_next or (port + 1) in self._index)

    def give_back(self, port: int) -> None:
        """Return a port to the pool (ignored when outside the range or already free)."""
        if self.min_port <= port <= self.max_port and port not in self._index:
            self._index[port] = len(self._free)
            self._free.append(port)


class _Entropy:
    """Bytes from the OS's CSPRNG, fetched 4 KiB at a time: one getrandom() system call
    per ~1,000 draws instead of one per port or allocation id (3 % of a setup's CPU)."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self.reset)  # a child never reuses our bytes

    def reset(self) -> None:
        self._buf, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._buf, self._pos = os.urandom(4096), 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out


_entropy = _Entropy()


def random_bytes(n: int) -> bytes:
    """n unpredictable bytes (n <= 4096)."""
    return _entropy.take(n)


def _random_below(n: int) -> int:
    """Uniform enough in [0, n) for n <= 65536 (bias < 2**-16)."""
    return int.from_bytes(_entropy.take(4), "big") % n
