"""Tenants as the core sees them: the rules an allocation follows by its tenant
(concurrent allocations across workers, bandwidth, peer-policy additions, a monthly
byte quota that was reached). A request's tenant is found by authentication
(core/auth.py: the realm it names, the user or the secret that verified it)."""

from __future__ import annotations

from dataclasses import dataclass

from turnserver.core.policy import PeerPolicy

DEFAULT_TENANT = "default"  # the implicit tenant: the top-level credentials


@dataclass(frozen=True, slots=True)
class TenantRules:
    """What a tenant's allocations obey beyond the server's own limits."""

    name: str
    max_allocations: int = 0  # concurrent, across workers (QuotaLedger); 0: none
    bandwidth: int = 0  # bytes a second per allocation; 0: the server's
    peer_policy: PeerPolicy | None = None  # None: the server's
    monthly_refuse: bool = True  # at the monthly quota: refuse new allocations (else warn)
