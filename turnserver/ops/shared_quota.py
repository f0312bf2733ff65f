"""Allocation quotas shared by worker processes: per worker, a total and per-bucket user
and client IP counts in shared memory, updated under one lock (core.quota.QuotaLedger)."""

from __future__ import annotations

import multiprocessing.synchronize
import zlib
from multiprocessing.shared_memory import SharedMemory

BUCKETS = 4096  # per-user counts are kept by hash bucket (collisions only make it stricter)
STRIDE = 1 + 2 * BUCKETS  # per worker: the total, user buckets, client IP buckets


class SharedQuotaLedger:
    """Implements core.quota.QuotaLedger across processes: per worker, a total and
    per-bucket user and client IP counts in shared memory, updated under one lock."""

    def __init__(
        self, shm_name: str, workers: int, index: int, lock: multiprocessing.synchronize.Lock
    ) -> None:
        self._shm = SharedMemory(name=shm_name)
        buf = self._shm.buf
        assert buf is not None
        self._table = buf.cast("I")
        self.workers = workers
        self.index = index
        self.lock = lock

    @staticmethod
    def size(workers: int) -> int:
        return workers * STRIDE * 4

    @staticmethod
    def _buckets(user: str, client_ip: str) -> tuple[int, int]:
        return (
            1 + zlib.crc32(user.encode()) % BUCKETS,
            1 + BUCKETS + zlib.crc32(client_ip.encode()) % BUCKETS,
        )

    def _sum(self, offset: int) -> int:
        t = self._table
        return sum(t[w * STRIDE + offset] for w in range(self.workers))

    def reserve(
        self, user: str, client_ip: str, max_total: int, max_per_user: int, max_per_ip: int
    ) -> str | None:
        t = self._table
        b_user, b_ip = self._buckets(user, client_ip)
        with self.lock:
            if max_total and self._sum(0) >= max_total:
                return "quota_total"
            if max_per_user and self._sum(b_user) >= max_per_user:
                return "quota_user"
            if max_per_ip and self._sum(b_ip) >= max_per_ip:
                return "quota_client_ip"
            base = self.index * STRIDE
            t[base] += 1
            t[base + b_user] += 1
            t[base + b_ip] += 1
        return None

    def close(self) -> None:
        """Let go of the shared memory (the view first, or close() refuses)."""
        self._table.release()
        self._shm.close()

    def release(self, user: str, client_ip: str) -> None:
        t = self._table
        base = self.index * STRIDE
        b_user, b_ip = self._buckets(user, client_ip)
        with self.lock:
            for i in (base, base + b_user, base + b_ip):
                t[i] = max(0, t[i] - 1)


def clear_worker(shm: SharedMemory, index: int, lock: multiprocessing.synchronize.Lock) -> None:
    """Forget a dead worker's allocations."""
    buf = shm.buf
    assert buf is not None
    table = buf.cast("I")
    with lock:
        for i in range(index * STRIDE, (index + 1) * STRIDE):
            table[i] = 0
    table.release()
