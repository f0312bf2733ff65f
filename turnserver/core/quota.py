"""Allocation quotas: total and per user. The ledger is injected so that worker
processes can share one (see ops/workers.py); this one is for a single process."""

from __future__ import annotations

from typing import Protocol


class QuotaLedger(Protocol):
    """Counts live allocations; `reserve` checks and counts in one step."""

    def reserve(self, user: str, max_total: int, max_per_user: int) -> str | None:
        """Count one more allocation for user, or return why not (a metrics reason)."""

    def release(self, user: str) -> None:
        """One allocation of user ended."""


class LocalQuotaLedger:
    """Counts in this process."""

    def __init__(self) -> None:
        self.total = 0
        self.per_user: dict[str, int] = {}

    def reserve(self, user: str, max_total: int, max_per_user: int) -> str | None:
        if max_total and self.total >= max_total:
            return "quota_total"
        count = self.per_user.get(user, 0)
        if max_per_user and count >= max_per_user:
            return "quota_user"
        self.total += 1
        self.per_user[user] = count + 1
        return None

    def release(self, user: str) -> None:
        count = self.per_user.get(user, 0) - 1
        if count > 0:
            self.per_user[user] = count
        else:
            self.per_user.pop(user, None)
        self.total = max(0, self.total - 1)
