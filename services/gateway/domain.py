"""Who is calling: a local view of users and keys, fed by identity events.

Authentication happens here, in memory, with no round trip: the view is rebuilt from the
`events.identity.>` stream at start and follows it live, so a revoked key stops working
on every gateway as soon as the revocation event arrives (milliseconds).
"""

from datetime import datetime
from enum import Enum

import msgspec

from contracts.events import identity as ev


class Principal(msgspec.Struct, frozen=True):
    user_id: str
    email: str
    org_id: str
    tier: str
    is_admin: bool
    key_id: str


class KeyRecord(msgspec.Struct):
    key_id: str
    user_id: str
    expires_at: datetime | None
    revoked: bool = False


class UserRecord(msgspec.Struct):
    user_id: str
    email: str
    org_id: str
    tier: str
    is_admin: bool


class Denied(Enum):
    UNKNOWN = "The API key is not valid."
    REVOKED = "The API key has been revoked."
    EXPIRED = "The API key has expired."


class AccessView:
    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}  # by key hash
        self.key_hashes: dict[str, str] = {}  # key id -> key hash
        self.users: dict[str, UserRecord] = {}
        self.org_names: dict[str, str] = {}

    def apply(self, payload: msgspec.Struct) -> None:
        if isinstance(payload, ev.ApiKeyIssued):
            known = self.keys.get(payload.key_hash)
            if known is not None:
                return  # learnt from the command's reply first; a later replay must not un-revoke it
            self.keys[payload.key_hash] = KeyRecord(payload.key_id, payload.user_id, payload.expires_at)
            self.key_hashes[payload.key_id] = payload.key_hash
        elif isinstance(payload, ev.ApiKeyRevoked):
            self.revoke(payload.key_id)
        elif isinstance(payload, ev.UserRegistered):
            if payload.user_id in self.users:
                return  # learnt from the command's reply first; tier changes may have followed
            self.users[payload.user_id] = UserRecord(
                payload.user_id, payload.email, payload.org_id, payload.tier, payload.is_admin
            )
        elif isinstance(payload, ev.TierChanged):
            user = self.users.get(payload.user_id)
            if user is not None:
                user.tier = payload.tier
        elif isinstance(payload, ev.OrgCreated):
            self.org_names[payload.org_id] = payload.name

    def revoke(self, key_id: str) -> None:
        key_hash = self.key_hashes.get(key_id)
        if key_hash is not None:
            self.keys[key_hash].revoked = True

    def principal_of_key(self, key_id: str, now: datetime) -> Principal | Denied:
        """The principal behind a key checked earlier (an MCP SSE session), if the key still works."""
        key_hash = self.key_hashes.get(key_id)
        if key_hash is None:
            return Denied.UNKNOWN
        return self.authenticate(key_hash, now)

    def authenticate(self, key_hash: str, now: datetime) -> Principal | Denied:
        key = self.keys.get(key_hash)
        if key is None:
            return Denied.UNKNOWN
        if key.revoked:
            return Denied.REVOKED
        if key.expires_at is not None and key.expires_at <= now:
            return Denied.EXPIRED
        user = self.users.get(key.user_id)
        if user is None:
            return Denied.UNKNOWN
        return Principal(user.user_id, user.email, user.org_id, user.tier, user.is_admin, key.key_id)
