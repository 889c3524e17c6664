"""Facts published by the quota service (subjects `events.quota.<name>`).

Every balance can be rebuilt from these: `reserved` opens a reservation, `usage_recorded`
(a call) or `committed` (a build slot or a server) confirms it, `released` closes it.
`usage_recorded` is the billing record: exactly one per charged call; dedupe on `usage_id`.
A `reserved` with `lease: true` holds `amount` calls that mcp_proxy runs without a hold
each; each of them is a `usage_recorded` (`held: false`, `lease_id` the lease), and the
lease's `released` frees what it did not spend (docs/quota.md, "Leases").
"""

from datetime import datetime

import msgspec


class Reserved(msgspec.Struct, kw_only=True):
    reservation_id: str  # UUIDv5 of (user id, key, a call's period): a key always names one reservation
    key: str
    user_id: str
    org_id: str
    kind: str  # "call" | "build_slot" | "server"
    amount: int
    tier: str
    period_start: datetime  # the period the reservation (and its charge) belongs to
    reserved_at: datetime
    expires_at: datetime | None = None  # released as "expired" then, unless committed before
    version: int = 1  # of the reservation: a released key reserved again is version 3, 5, ...
    lease: bool = False  # a lease of `amount` calls, spent by `usage_recorded` naming it


class Committed(msgspec.Struct, kw_only=True):
    """A build slot or a server reservation was confirmed (calls publish usage_recorded)."""

    reservation_id: str
    key: str
    user_id: str
    org_id: str
    kind: str
    amount: int
    period_start: datetime
    version: int = 2


class UsageRecorded(msgspec.Struct, kw_only=True):
    """One charged tool call, for billing. `usage_id` is stable: dedupe on it."""

    usage_id: str  # = reservation_id, derived from (user id, request id)
    key: str  # the tool call's request id
    user_id: str
    org_id: str
    kind: str
    amount: int
    tier: str
    period_start: datetime
    reserved_at: datetime
    recorded_at: datetime
    version: int = 2  # of the reservation
    # False: an unmetered call charged without a hold; this event opens and closes its
    # reservation (reserved_at = recorded_at), no `reserved` event precedes it.
    held: bool = True
    lease_id: str | None = None  # held false: the lease (reservation id) whose unit it spent


class Released(msgspec.Struct, kw_only=True):
    reservation_id: str
    key: str
    user_id: str
    org_id: str
    kind: str
    amount: int
    period_start: datetime
    reason: str  # "expired" (timed out, set by the service) or the caller's reason
    was_committed: bool = False  # a committed slot (build, server) freed
    version: int = 2


class Refused(msgspec.Struct, kw_only=True):
    """A reservation was refused over a limit (recorded at most once a minute per user and kind)."""

    user_id: str
    org_id: str
    kind: str
    amount: int
    tier: str
    used: int
    limit: int
    sentence: str
    key: str = ""


EVENTS: dict[str, type[msgspec.Struct]] = {
    "quota.reserved": Reserved,
    "quota.committed": Committed,
    "quota.usage_recorded": UsageRecorded,
    "quota.released": Released,
    "quota.refused": Refused,
}
