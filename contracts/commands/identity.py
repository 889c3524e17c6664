"""Commands answered by the identity service (`cmd.identity.<verb>`)."""

from datetime import datetime

import msgspec

from contracts.commands.common import CommandMeta

TIERS = ("free", "pro", "team", "enterprise")


class CreateUser(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    email: str
    org: str | None = None  # org name (created if new); a personal org is made when absent
    org_id: str | None = None  # join this existing org instead (used by org admins)
    tier: str = "free"
    is_admin: bool = False
    key_name: str = "default"


class UserCreated(msgspec.Struct, kw_only=True):
    user_id: str
    org_id: str
    key_id: str
    api_key: str  # shown once


class EnsureBootstrapAdmin(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    email: str
    org: str = "default"


class BootstrapAdmin(msgspec.Struct, kw_only=True):
    created: bool
    user_id: str
    api_key: str | None = None


class UserView(msgspec.Struct, kw_only=True):
    user_id: str
    email: str
    org_id: str
    tier: str
    is_admin: bool
    created_at: datetime


class ListUsers(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str


class UserList(msgspec.Struct):
    users: list[UserView]


class SetTier(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str  # the admin's org: a user of another org answers 404
    user_id: str
    tier: str


class IssueKey(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    user_id: str
    name: str
    expires_in_days: int | None = None


class KeyView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class KeyIssued(msgspec.Struct, kw_only=True):
    id: str
    name: str
    api_key: str  # shown once
    prefix: str
    created_at: datetime
    expires_at: datetime | None = None


class ListKeys(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    user_id: str


class KeyList(msgspec.Struct):
    keys: list[KeyView]


class RevokeKey(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    user_id: str
    key_id: str


class TouchKey(msgspec.Struct, kw_only=True):
    """Fire-and-forget: a gateway saw this key in use (sent at most once a minute per key)."""

    user_id: str
    key_id: str
    used_at: datetime
