"""Which recorded identity events become public facts, and in what shape.

Aggregate events are classes eventsourcing makes from the `@event` decorators, so they are
matched here by their qualified name (`User.KeyIssued`), which is also their stored topic.
"""

from typing import Any

import msgspec

from contracts.events import identity as ev
from services.kit.outbox import Outgoing

_SERVICE_META: dict[str, Any] = {"actor": {"kind": "service", "id": "identity"}}


def _payload(kind: str, oid: str, e: Any) -> msgspec.Struct | None:
    if kind == "Org.Created":
        return ev.OrgCreated(org_id=oid, name=e.name, personal=e.personal)
    if kind == "User.Registered":
        return ev.UserRegistered(
            user_id=oid, email=e.email, org_id=e.org_id, tier=e.tier, is_admin=e.is_admin
        )
    if kind == "User.TierChanged":
        return ev.TierChanged(user_id=oid, tier=e.tier, previous_tier=e.previous_tier)
    if kind == "User.KeyIssued":
        return ev.ApiKeyIssued(
            key_id=e.key_id,
            user_id=oid,
            name=e.name,
            prefix=e.prefix,
            key_hash=e.key_hash,
            created_at=e.created_at,
            expires_at=e.expires_at,
        )
    if kind == "User.KeyRevoked":
        return ev.ApiKeyRevoked(key_id=e.key_id, user_id=oid, revoked_at=e.revoked_at)
    if kind == "User.KeyUsed":
        return ev.ApiKeyUsed(key_id=e.key_id, user_id=oid, used_at=e.used_at)
    # Org.MemberAdded and EmailClaim.Claimed are internal bookkeeping: UserRegistered says it.
    return None


def translate(event: Any) -> Outgoing | None:
    oid = str(event.originator_id)
    payload = _payload(type(event).__qualname__, oid, event)
    if payload is None:
        return None
    meta: dict[str, Any] = getattr(event, "meta", None) or _SERVICE_META
    org_id = oid if isinstance(payload, ev.OrgCreated) else meta.get("org_id")
    if isinstance(payload, ev.UserRegistered):
        org_id = payload.org_id
    return Outgoing(payload, org_id, meta)
