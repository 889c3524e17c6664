"""Which recorded quota events become public facts, and in what shape.

A committed call is published as `quota.usage_recorded` (the billing record, one per
charged call), and so is a call charged without a hold of its own, unmetered or a unit of a
lease (`held: false`, `lease_id`: that one event opens and charges its reservation); a
committed build slot or server as `quota.committed`. Writer seals stay internal.
"""

from datetime import datetime
from typing import Any

import msgspec

from contracts.events import quota as ev
from services.kit.outbox import Outgoing
from services.quota.adapters.store import RefusalEvents, ReservationEvents

_SERVICE_META: dict[str, Any] = {"actor": {"kind": "service", "id": "quota"}}


def _payload(e: Any) -> msgspec.Struct | None:
    rid = str(e.originator_id)
    if isinstance(e, ReservationEvents.Reserved) and e.charged:  # unmetered, or a lease's unit
        return _usage(e, rid, e.timestamp, held=False, lease_id=e.from_lease)
    if isinstance(e, ReservationEvents.Reserved):
        return ev.Reserved(
            reservation_id=rid,
            key=e.key,
            user_id=e.user_id,
            org_id=e.org_id,
            kind=e.kind,
            amount=e.amount,
            tier=e.tier,
            period_start=e.period_start,
            reserved_at=e.timestamp,
            expires_at=e.expires_at,
            version=e.originator_version,
            lease=e.lease,
        )
    if isinstance(e, ReservationEvents.Committed):
        if e.kind == "call":
            return _usage(e, rid, e.reserved_at, held=True)
        return ev.Committed(
            reservation_id=rid,
            key=e.key,
            user_id=e.user_id,
            org_id=e.org_id,
            kind=e.kind,
            amount=e.amount,
            period_start=e.period_start,
            version=e.originator_version,
        )
    if isinstance(e, ReservationEvents.Released):
        return ev.Released(
            reservation_id=rid,
            key=e.key,
            user_id=e.user_id,
            org_id=e.org_id,
            kind=e.kind,
            amount=e.amount,
            period_start=e.period_start,
            reason=e.reason,
            was_committed=e.was_committed,
            version=e.originator_version,
        )
    if isinstance(e, RefusalEvents.Recorded):
        return ev.Refused(
            user_id=e.user_id,
            org_id=e.org_id,
            kind=e.kind,
            amount=e.amount,
            tier=e.tier,
            used=e.used,
            limit=e.limit,
            sentence=e.sentence,
            key=e.key,
        )
    return None


def _usage(
    e: Any, rid: str, reserved_at: datetime, held: bool, lease_id: str | None = None
) -> ev.UsageRecorded:
    """The billing record of a charged call (a commit, or the one fact of a call charged
    without a hold of its own: unmetered, or a unit of the lease `lease_id`)."""
    return ev.UsageRecorded(
        usage_id=rid,
        key=e.key,
        user_id=e.user_id,
        org_id=e.org_id,
        kind=e.kind,
        amount=e.amount,
        tier=e.tier,
        period_start=e.period_start,
        reserved_at=reserved_at,
        recorded_at=e.timestamp,
        version=e.originator_version,
        held=held,
        lease_id=lease_id,
    )


def translate(event: Any) -> Outgoing | None:
    payload = _payload(event)
    if payload is None:
        return None
    meta: dict[str, Any] = getattr(event, "meta", None) or _SERVICE_META
    return Outgoing(payload, getattr(event, "org_id", None), meta)
