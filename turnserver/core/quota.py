"""Allocation quotas: in all, per user and per client IP address. The ledger is injected
so that worker processes can share one (see ops/process/); this one is for a single
process."""

from __future__ import annotations

from typing import Protocol

from turnserver.core.tenants import DEFAULT_TENANT


def tenant_key(tenant: str) -> str:
    """The tenant an allocation counts for in a ledger: "" for the implicit tenant
    (it has no quota of its own, and is not counted)."""
    return "" if tenant == DEFAULT_TENANT else tenant


class QuotaLedger(Protocol):
    """Counts live allocations; `reserve` checks and counts in one step."""

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
        """Count one more allocation for user, client IP and tenant (tenant_key), or
        return why not (a metrics reason: quota_total, quota_user, quota_client_ip or
        quota_tenant)."""

    def release(self, user: str, client_ip: str, tenant: str = "") -> None:
        """One allocation of user from client IP (of tenant) ended."""


class LocalQuotaLedger:
    """Counts in this process."""

    def __init__(self) -> None:
        self.total = 0
        self.per_user: dict[str, int] = {}
        self.per_ip: dict[str, int] = {}
        self.per_tenant: dict[str, int] = {}

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
        if max_total and self.total >= max_total:
            return "quota_total"
        count = self.per_user.get(user, 0)
        if max_per_user and count >= max_per_user:
            return "quota_user"
        from_ip = self.per_ip.get(client_ip, 0)
        if max_per_ip and from_ip >= max_per_ip:
            return "quota_client_ip"
        if tenant:
            in_tenant = self.per_tenant.get(tenant, 0)
            if max_per_tenant and in_tenant >= max_per_tenant:
                return "quota_tenant"
            self.per_tenant[tenant] = in_tenant + 1
        self.total += 1
        self.per_user[user] = count + 1
        self.per_ip[client_ip] = from_ip + 1
        return None

    def release(self, user: str, client_ip: str, tenant: str = "") -> None:
        if tenant:
            decrement(self.per_tenant, tenant)
        decrement(self.per_user, user)
        decrement(self.per_ip, client_ip)
        self.total = max(0, self.total - 1)


def decrement(counts: dict[str, int], key: str) -> None:
    """One less of `key`; a count that reaches 0 leaves the table."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
