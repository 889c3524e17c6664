"""Request and response bodies of the public API (msgspec; validated by Litestar)."""

from datetime import datetime
from typing import Annotated

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Email = Annotated[str, msgspec.Meta(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")]
Tier = Annotated[str, msgspec.Meta(pattern=r"^(free|pro|team|enterprise)$")]
OrgName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class Health(msgspec.Struct):
    status: str


class Me(msgspec.Struct):
    user_id: str
    email: str
    org_id: str
    tier: str
    is_admin: bool


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    expires_in_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] | None = None


class IssuedKey(msgspec.Struct):
    id: str
    name: str
    api_key: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None


class KeyInfo(msgspec.Struct):
    id: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    org: OrgName | None = None
    tier: Tier = "free"
    is_admin: bool = False


class CreatedUser(msgspec.Struct):
    user_id: str
    api_key: str


class TierChange(msgspec.Struct, forbid_unknown_fields=True):
    tier: Tier


class UserInfo(msgspec.Struct):
    user_id: str
    email: str
    org_id: str
    tier: str
    is_admin: bool
    created_at: datetime


class SecretValue(msgspec.Struct):
    """`PUT /v1/secrets/{name}`: the value (1 byte to 16 KiB, may be multi-line).

    Unknown fields are ignored, not refused: a refusal would quote the field's name, and a
    value pasted in the wrong place would come back in the error.
    """

    value: str


class SecretInfo(msgspec.Struct):
    """Metadata only: the value is never returned."""

    name: str
    scope: str  # "user" | "org"
    fingerprint: str
    key_id: str
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None
