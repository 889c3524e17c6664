"""Users, orgs and API keys: the rules, with no I/O.

An API key is `mcp_` + 256 random bits (base64url). Only an HMAC-SHA256 of it under a
server-side pepper is kept: keys have full entropy, so a slow password hash would add
latency on every request without adding safety, while the pepper keeps a leaked table
useless for offline guessing.
"""

import base64
import hashlib
import hmac
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

from eventsourcing.domain import Aggregate, event

TIERS = ("free", "pro", "team", "enterprise")
KEY_PREFIX = "mcp_"
PREFIX_LENGTH = 12  # "mcp_" + 8 characters, shown in listings
MAX_ACTIVE_KEYS = 50
MAX_EXPIRY_DAYS = 3650
TOUCH_INTERVAL = timedelta(seconds=60)
NAMESPACE = uuid.UUID("0b5c1a8e-6a57-4d0e-8f4a-3d8e2f1c9a77")

Meta = dict[str, Any]


class IdentityError(Exception):
    """A rule was broken; the message is for a human."""


class NotFound(IdentityError):
    pass


class Conflict(IdentityError):
    pass


class Invalid(IdentityError):
    pass


# -- keys -------------------------------------------------------------------------------
def mint_key() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_key(key: str, pepper: bytes) -> str:
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def looks_like_key(key: str) -> bool:
    return key.startswith(KEY_PREFIX) and 40 <= len(key) <= 64


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    local, _, domain = email.partition("@")
    if not local or not domain or " " in email or len(email) > 254:
        raise Invalid(f"{email!r} is not a valid email address")
    return email


def normalize_org(name: str) -> str:
    name = name.strip().lower()
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise Invalid("org names are 1-64 characters of letters, digits, '-', '_' or '.'")
    return name


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise Invalid(f"unknown tier {tier!r}; tiers are {', '.join(TIERS)}")
    return tier


# -- aggregates -------------------------------------------------------------------------
class Org(Aggregate):
    """An org is named; its id derives from the name so two creations of one org collide."""

    @staticmethod
    def create_id(name: str, personal: bool, meta: Meta) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, f"org:{name}")

    @event("Created")
    def __init__(self, name: str, personal: bool, meta: Meta) -> None:
        self.name = name
        self.personal = personal
        self.members: list[str] = []

    @event("MemberAdded")
    def add_member(self, user_id: str, meta: Meta) -> None:
        self.members.append(user_id)


class EmailClaim(Aggregate):
    """Reserves an email address: the second claim of one address fails to save."""

    @staticmethod
    def create_id(email: str, user_id: str) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, f"email:{email}")

    @event("Claimed")
    def __init__(self, email: str, user_id: str) -> None:
        self.email = email
        self.user_id = user_id


class User(Aggregate):
    @event("Registered")
    def __init__(self, email: str, org_id: str, tier: str, is_admin: bool, meta: Meta) -> None:
        # `meta` (actor, correlation id, trace context, org id) rides on every event and
        # becomes the envelope when the outbox relay publishes it.
        self.email = email
        self.org_id = org_id
        self.tier = tier
        self.is_admin = is_admin
        self.keys: dict[str, dict[str, Any]] = {}

    # tier
    def set_tier(self, tier: str, meta: Meta) -> bool:
        check_tier(tier)
        if tier == self.tier:
            return False
        self._tier_changed(tier=tier, previous_tier=self.tier, meta=self._scoped(meta))
        return True

    @event("TierChanged")
    def _tier_changed(self, tier: str, previous_tier: str, meta: Meta) -> None:
        self.tier = tier

    # keys
    def active_keys(self, now: datetime) -> int:
        return sum(1 for k in self.keys.values() if _is_active(k, now))

    def issue_key(
        self,
        name: str,
        key_hash: str,
        prefix: str,
        now: datetime,
        expires_in_days: int | None,
        meta: Meta,
    ) -> str:
        name = name.strip()
        if not name or len(name) > 100:
            raise Invalid("a key name is 1-100 characters")
        if expires_in_days is not None and not 1 <= expires_in_days <= MAX_EXPIRY_DAYS:
            raise Invalid(f"expires_in_days must be between 1 and {MAX_EXPIRY_DAYS}")
        if self.active_keys(now) >= MAX_ACTIVE_KEYS:
            raise Conflict(f"you already have {MAX_ACTIVE_KEYS} active keys; revoke one first")
        key_id = str(uuid.uuid4())
        expires_at = now + timedelta(days=expires_in_days) if expires_in_days else None
        self._key_issued(
            key_id=key_id,
            name=name,
            prefix=prefix,
            key_hash=key_hash,
            created_at=now,
            expires_at=expires_at,
            meta=self._scoped(meta),
        )
        return key_id

    @event("KeyIssued")
    def _key_issued(
        self,
        key_id: str,
        name: str,
        prefix: str,
        key_hash: str,
        created_at: datetime,
        expires_at: datetime | None,
        meta: Meta,
    ) -> None:
        self.keys[key_id] = {
            "id": key_id,
            "name": name,
            "prefix": prefix,
            "key_hash": key_hash,
            "created_at": created_at,
            "expires_at": expires_at,
            "last_used_at": None,
            "revoked_at": None,
        }

    def revoke_key(self, key_id: str, now: datetime, meta: Meta) -> bool:
        """False when the key was already revoked: revoking twice is not an error."""
        key = self._key(key_id)
        if key["revoked_at"] is not None:
            return False
        self._key_revoked(key_id=key_id, revoked_at=now, meta=self._scoped(meta))
        return True

    @event("KeyRevoked")
    def _key_revoked(self, key_id: str, revoked_at: datetime, meta: Meta) -> None:
        self.keys[key_id]["revoked_at"] = revoked_at

    def touch_key(self, key_id: str, now: datetime) -> bool:
        """Records use at most once per TOUCH_INTERVAL per key."""
        key = self.keys.get(key_id)
        if key is None or key["revoked_at"] is not None:
            return False
        last = key["last_used_at"]
        if last is not None and now - last < TOUCH_INTERVAL:
            return False
        actor = {"kind": "user", "id": str(self.id), "key_id": key_id}
        self._key_used(key_id=key_id, used_at=now, meta=self._scoped({"actor": actor}))
        return True

    @event("KeyUsed")
    def _key_used(self, key_id: str, used_at: datetime, meta: Meta) -> None:
        self.keys[key_id]["last_used_at"] = used_at

    def _scoped(self, meta: Meta) -> Meta:
        """Every fact about a user names the user's org (events are routed and audited by org)."""
        return {**meta, "org_id": self.org_id}

    def _key(self, key_id: str) -> dict[str, Any]:
        key = self.keys.get(key_id)
        if key is None:
            raise NotFound(f"No API key {key_id} belongs to this user.")
        return key


def _is_active(key: dict[str, Any], now: datetime) -> bool:
    return key["revoked_at"] is None and (key["expires_at"] is None or key["expires_at"] > now)
