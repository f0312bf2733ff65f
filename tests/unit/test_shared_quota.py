"""The shared quota ledger against a dict model: exact counts by full key across
workers, deletions that leave no holes in probe runs, a dead worker's counts cleared."""

from __future__ import annotations

import multiprocessing
import random
from collections import Counter
from multiprocessing.shared_memory import SharedMemory

from turnserver.ops.process.shared_quota import (
    SharedQuotaLedger,
    clear_worker,
    ledger_size,
    table_slots,
)


def _ledgers(workers: int, capacity: int) -> tuple[SharedMemory, list[SharedQuotaLedger], int]:
    slots = table_slots(capacity)
    shm = SharedMemory(create=True, size=ledger_size(workers, slots))
    lock = multiprocessing.get_context("spawn").Lock()
    secret = b"k" * 32
    return (
        shm,
        [SharedQuotaLedger(shm.name, workers, i, lock, slots, secret) for i in range(workers)],
        slots,
    )


def test_counts_are_exact_and_follow_a_model() -> None:
    shm, ledgers, slots = _ledgers(3, 200)
    try:
        rng = random.Random(7)
        users = [f"u{i}" for i in range(60)]
        ips = [f"10.0.{i // 8}.{i}" for i in range(40)]
        live: list[tuple[int, str, str]] = []
        per_user: Counter[str] = Counter()
        per_ip: Counter[str] = Counter()
        for step in range(5000):
            if live and (len(live) >= 190 or rng.random() < 0.45):
                w, u, ip = live.pop(rng.randrange(len(live)))
                ledgers[w].release(u, ip)
                per_user[u] -= 1
                per_ip[ip] -= 1
            else:
                w, u, ip = rng.randrange(3), rng.choice(users), rng.choice(ips)
                why = ledgers[w].reserve(u, ip, 190, 4, 6)
                expected = (
                    "quota_total"
                    if len(live) >= 190
                    else "quota_user"
                    if per_user[u] >= 4
                    else "quota_client_ip"
                    if per_ip[ip] >= 6
                    else None
                )
                assert why == expected, (step, why, expected)
                if why is None:
                    live.append((w, u, ip))
                    per_user[u] += 1
                    per_ip[ip] += 1
            if step % 250 == 0:
                for u in users:
                    assert ledgers[0].count(user=u) == per_user[u]
                for ip in ips:
                    assert ledgers[1].count(client_ip=ip) == per_ip[ip]
        # a dead worker's allocations no longer count, the others' still do
        clear_worker(shm, 3, slots, 1, ledgers[0].lock)
        survivors = [(w, u, ip) for w, u, ip in live if w != 1]
        for u in users:
            assert ledgers[2].count(user=u) == sum(1 for _, x, _ in survivors if x == u)
        for w, u, ip in survivors:
            ledgers[w].release(u, ip)
        assert all(ledgers[0].count(user=u) == 0 for u in users)
        # every slot is empty again: nothing leaks
        raw = bytes(shm.buf[12 : 12 + 2 * slots * (16 + 12)])
        assert raw == bytes(len(raw))
    finally:
        for ledger in ledgers:
            ledger.close()
        shm.close()
        shm.unlink()


def test_similar_keys_never_share_a_count() -> None:
    """Keys an attacker would pick against a linear hash (crc32 buckets): each counts
    alone."""
    shm, ledgers, _ = _ledgers(2, 1000)
    try:
        for i in range(500):
            assert ledgers[i % 2].reserve(f"user{i}", f"2001:db8::{i:x}", 0, 1, 1) is None
        for i in range(500):
            assert ledgers[0].count(user=f"user{i}") == 1
            assert ledgers[1].reserve(f"user{i}", "192.0.2.1", 0, 1, 0) == "quota_user"
    finally:
        for ledger in ledgers:
            ledger.close()
        shm.close()
        shm.unlink()
