"""Per-user allocation quotas across a fleet (fleet.max_allocations_per_user), sans I/O.

A fleet-wide count lives in Redis (ops/fleet/quota.py). An Allocate that passed every
check of its own waits for a lease: the core answers nothing yet (DeferredResponse) and
emits FleetLeaseNeeded with the request's bytes; the I/O layer asks, then calls
fleet_lease_result, which runs the request again with the lease granted or refused. A
retransmission while the lease is asked for is dropped (its answer is on the way). An
allocation that holds a lease gives it back when it ends (FleetLeaseReleased). One
question per Allocate, none on the relay path.
"""

from __future__ import annotations

from turnserver.core.five_tuple import FiveTuple

MAX_PENDING = 1024  # Allocates waiting for a lease, in all; beyond, 486 (try later)

LeaseKey = tuple[FiveTuple, bytes]  # the 5-tuple and the Allocate's transaction id


class FleetLeases:
    """The core's book of leases asked for and answered."""

    __slots__ = ("granted", "limit", "pending", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # allocations per user across the fleet
        self.pending: set[LeaseKey] = set()  # asked for
        self.granted: set[LeaseKey] = set()  # answered yes, not yet taken
        self.refused: set[LeaseKey] = set()  # answered no, not yet told
