"""Facts published by the identity service (subjects `events.identity.<name>`).

Key material never travels: `key_hash` is a keyed HMAC of the key, enough for a gateway
to recognise a presented key and useless for forging one.
"""

from datetime import datetime

import msgspec


class OrgCreated(msgspec.Struct, kw_only=True):
    org_id: str
    name: str
    personal: bool = False


class UserRegistered(msgspec.Struct, kw_only=True):
    user_id: str
    email: str
    org_id: str
    tier: str
    is_admin: bool = False


class TierChanged(msgspec.Struct, kw_only=True):
    user_id: str
    tier: str
    previous_tier: str


class ApiKeyIssued(msgspec.Struct, kw_only=True):
    key_id: str
    user_id: str
    name: str
    prefix: str
    key_hash: str
    created_at: datetime
    expires_at: datetime | None = None


class ApiKeyRevoked(msgspec.Struct, kw_only=True):
    key_id: str
    user_id: str
    revoked_at: datetime


class ApiKeyUsed(msgspec.Struct, kw_only=True):
    key_id: str
    user_id: str
    used_at: datetime


EVENTS: dict[str, type[msgspec.Struct]] = {
    "identity.org_created": OrgCreated,
    "identity.user_registered": UserRegistered,
    "identity.tier_changed": TierChanged,
    "identity.api_key_issued": ApiKeyIssued,
    "identity.api_key_revoked": ApiKeyRevoked,
    "identity.api_key_used": ApiKeyUsed,
}
