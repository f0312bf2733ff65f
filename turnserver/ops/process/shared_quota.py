"""Allocation quotas shared by worker processes, exact per user and per client address.

Shared memory holds, per worker, its allocation total, and two open-addressing hash
tables (users, client IP addresses) whose slots are a 128-bit keyed BLAKE2b digest of
the full key and one count per worker. The digest key is a random secret of the
supervisor's, so no client can choose a collision (and two keys meeting by chance is a
2^-64 event at a billion keys); counts are by key, never by bucket. Memory is fixed at
start: each table has twice as many slots as there can be live allocations, so it is
never more than half full. Updates take one lock. A dead worker's column is cleared by
the supervisor, and its keys with nothing left leave the tables.
"""

from __future__ import annotations

import hashlib
import multiprocessing.synchronize
import struct
from multiprocessing.shared_memory import SharedMemory

DIGEST = 16
MAX_SLOTS = 1 << 20  # per table: room for 524,288 live allocations


def table_slots(capacity: int) -> int:
    """Slots per table for `capacity` live allocations (a power of two, half full)."""
    slots = 64
    while slots < 2 * capacity and slots < MAX_SLOTS:
        slots *= 2
    return slots


class _Layout:
    def __init__(self, workers: int, slots: int) -> None:
        self.workers = workers
        self.slots = slots
        self.slot = struct.Struct(f"={DIGEST}s{workers}I")
        self.counts = struct.Struct(f"={workers}I")
        self.totals = struct.Struct(f"={workers}I")
        self.tables = (self.totals.size, self.totals.size + slots * self.slot.size)
        self.size = self.tables[1] + slots * self.slot.size


def ledger_size(workers: int, slots: int) -> int:
    """Bytes of shared memory for `workers` and `slots` per table."""
    return _Layout(workers, slots).size


class SharedQuotaLedger:
    """Implements core.quota.QuotaLedger across processes (see the module docstring)."""

    def __init__(
        self,
        shm_name: str,
        workers: int,
        index: int,
        lock: multiprocessing.synchronize.Lock,
        slots: int,
        secret: bytes,
    ) -> None:
        self._shm = SharedMemory(name=shm_name)
        buf = self._shm.buf
        assert buf is not None
        self._buf = buf
        self.layout = _Layout(workers, slots)
        self.workers = workers
        self.index = index
        self.lock = lock
        self._secret = secret

    def _digest(self, table: int, key: str, person: bytes = b"") -> bytes:
        person = person or (b"user" if table == 0 else b"client-ip")
        return hashlib.blake2b(
            key.encode("utf-8", "surrogatepass"),
            digest_size=DIGEST,
            key=self._secret,
            person=person,
        ).digest()

    def _find(self, table: int, digest: bytes) -> tuple[int, bool]:
        """(slot index, found): the key's slot, or the empty slot where it would go."""
        layout = self.layout
        base, size, mask = layout.tables[table], layout.slot.size, layout.slots - 1
        buf = self._buf
        i = int.from_bytes(digest[:8], "little") & mask
        for _ in range(layout.slots):
            at = base + i * size
            held = bytes(buf[at : at + DIGEST])
            if held == digest:
                return i, True
            if held == _EMPTY:
                return i, False
            i = (i + 1) & mask
        return -1, False  # full (cannot happen below capacity)

    def _count(self, table: int, slot: int) -> int:
        layout = self.layout
        at = layout.tables[table] + slot * layout.slot.size + DIGEST
        return sum(layout.counts.unpack_from(self._buf, at))

    def _add(self, table: int, slot: int, digest: bytes, delta: int) -> None:
        layout = self.layout
        at = layout.tables[table] + slot * layout.slot.size
        counts = list(layout.counts.unpack_from(self._buf, at + DIGEST))
        counts[self.index] = max(0, counts[self.index] + delta)
        if any(counts):
            layout.slot.pack_into(self._buf, at, digest, *counts)
        else:
            _delete(self._buf, layout, table, slot)

    def _total(self) -> int:
        return sum(self.layout.totals.unpack_from(self._buf, 0))

    def _add_total(self, delta: int) -> None:
        totals = list(self.layout.totals.unpack_from(self._buf, 0))
        totals[self.index] = max(0, totals[self.index] + delta)
        self.layout.totals.pack_into(self._buf, 0, *totals)

    def reserve(
        self,
        user: str,
        client_ip: str,
        max_total: int,
        max_per_user: int,
        max_per_ip: int,
        tenant: str = "",
        max_per_tenant: int = 0,
    ) -> str | None:
        d_user, d_ip = self._digest(0, user), self._digest(1, client_ip)
        # a tenant counts in the users' table under its own BLAKE2b person: no user
        # name can stand for it
        d_tenant = self._digest(0, tenant, b"tenant") if tenant else b""
        with self.lock:
            if max_total and self._total() >= max_total:
                return "quota_total"
            s_user, found_user = self._find(0, d_user)
            s_ip, found_ip = self._find(1, d_ip)
            if s_user < 0 or s_ip < 0:
                return "quota_total"  # more keys than allocations can exist: never
            if max_per_user and found_user and self._count(0, s_user) >= max_per_user:
                return "quota_user"
            if max_per_ip and found_ip and self._count(1, s_ip) >= max_per_ip:
                return "quota_client_ip"
            if d_tenant:
                s_tenant, found_tenant = self._find(0, d_tenant)
                if s_tenant < 0:
                    return "quota_total"
                if max_per_tenant and found_tenant and self._count(0, s_tenant) >= max_per_tenant:
                    return "quota_tenant"
                self._add(0, s_tenant, d_tenant, 1)
                s_user, _ = self._find(0, d_user)  # the tenant's entry may have taken its slot
            self._add(0, s_user, d_user, 1)
            self._add(1, s_ip, d_ip, 1)
            self._add_total(1)
        return None

    def release(self, user: str, client_ip: str, tenant: str = "") -> None:
        d_user, d_ip = self._digest(0, user), self._digest(1, client_ip)
        pairs = [(0, d_user), (1, d_ip)]
        if tenant:
            pairs.append((0, self._digest(0, tenant, b"tenant")))
        with self.lock:
            for table, digest in pairs:
                slot, found = self._find(table, digest)
                if found:
                    self._add(table, slot, digest, -1)
            self._add_total(-1)

    def count(self, user: str = "", client_ip: str = "") -> int:
        """Live allocations of a user (or a client address) across workers."""
        table, key = (0, user) if user else (1, client_ip)
        digest = self._digest(table, key)
        with self.lock:
            slot, found = self._find(table, digest)
            return self._count(table, slot) if found else 0

    def close(self) -> None:
        """Let go of the shared memory (the view first, or close() refuses)."""
        self._buf.release()
        self._shm.close()


_EMPTY = bytes(DIGEST)


def _delete(buf: memoryview, layout: _Layout, table: int, slot: int) -> None:
    """Empty a slot, moving later entries of its probe run back (no tombstones: lookups
    stay as short as the table's load allows)."""
    base, size, mask = layout.tables[table], layout.slot.size, layout.slots - 1
    hole = slot
    i = slot
    while True:
        i = (i + 1) & mask
        at = base + i * size
        digest = bytes(buf[at : at + DIGEST])
        if digest == _EMPTY:
            break
        home = int.from_bytes(digest[:8], "little") & mask
        # the entry at i may move into the hole if its home is not in (hole, i]
        if (i - home) & mask >= (i - hole) & mask:
            buf[base + hole * size : base + (hole + 1) * size] = buf[at : at + size]
            hole = i
    buf[base + hole * size : base + (hole + 1) * size] = bytes(size)


def clear_worker(
    shm: SharedMemory, workers: int, slots: int, index: int, lock: multiprocessing.synchronize.Lock
) -> None:
    """Forget a dead worker's allocations: its total and its column of every slot; keys
    left with no allocation leave the tables (they are rebuilt without them)."""
    layout = _Layout(workers, slots)
    buf = shm.buf
    assert buf is not None
    with lock:
        totals = list(layout.totals.unpack_from(buf, 0))
        totals[index] = 0
        layout.totals.pack_into(buf, 0, *totals)
        for table in (0, 1):
            base, size = layout.tables[table], layout.slot.size
            live: list[tuple[bytes, list[int]]] = []
            for i in range(slots):
                at = base + i * size
                digest, *counts = layout.slot.unpack_from(buf, at)
                if digest == _EMPTY:
                    continue
                counts[index] = 0
                if any(counts):
                    live.append((digest, counts))
            buf[base : base + slots * size] = bytes(slots * size)
            mask = slots - 1
            for digest, counts in live:
                i = int.from_bytes(digest[:8], "little") & mask
                while bytes(buf[base + i * size : base + i * size + DIGEST]) != _EMPTY:
                    i = (i + 1) & mask
                layout.slot.pack_into(buf, base + i * size, digest, *counts)
