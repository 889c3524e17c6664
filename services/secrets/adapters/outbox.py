"""Which recorded secrets events become public facts, and in what shape.

The recorded `Secret.Stored` holds the ciphertext and nonce; the public `secret_stored`
does not (no consumer needs them). Nothing here can carry a value: the service never
records one.
"""

from typing import Any

import msgspec

from contracts.events import secrets as ev
from services.kit.outbox import Outgoing
from services.secrets.domain import ORG_OWNER, scope_of

_SERVICE_META: dict[str, Any] = {"actor": {"kind": "service", "id": "secrets"}}


def _owner_user(owner: str) -> str | None:
    return None if owner == ORG_OWNER else owner


def _payload(kind: str, oid: str, e: Any) -> msgspec.Struct | None:
    if kind == "Secret.Stored":
        return ev.SecretStored(
            secret_id=oid,
            name=e.name,
            scope=scope_of(e.owner),
            user_id=_owner_user(e.owner),
            version=e.value_version,
            fingerprint=e.fingerprint,
            key_id=e.kid,
            stored_at=e.stored_at,
        )
    if kind == "Secret.Revoked":
        return ev.SecretRevoked(
            secret_id=oid,
            name=e.name,
            scope=scope_of(e.owner),
            user_id=_owner_user(e.owner),
            version=e.value_version,
            revoked_at=e.revoked_at,
        )
    if kind == "RevealRecord.Recorded":
        return ev.SecretRevealed(
            secret_id=e.secret_id,
            name=e.name,
            scope=scope_of(e.owner),
            user_id=e.user_id,
            service=e.service,
            purpose=e.purpose,
            version=e.value_version,
            revealed_at=e.revealed_at,
        )
    if kind == "Refusal.Recorded":
        return ev.RevealDenied(
            name=e.name,
            scope=e.scope,
            user_id=e.user_id,
            service=e.service,
            purpose=e.purpose,
            reason=e.reason,
            denied_at=e.denied_at,
        )
    if kind == "RewrapRun.Recorded":
        return ev.DataKeysRewrapped(key_id=e.kid, count=e.count, from_key_ids=e.from_kids, rewrapped_at=e.at)
    # Secret.Created, Shelf.* are internal bookkeeping.
    return None


def translate(event: Any) -> Outgoing | None:
    payload = _payload(type(event).__qualname__, str(event.originator_id), event)
    if payload is None:
        return None
    meta: dict[str, Any] = getattr(event, "meta", None) or _SERVICE_META
    return Outgoing(payload, meta.get("org_id"), meta)
