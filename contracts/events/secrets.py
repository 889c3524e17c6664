"""Facts published by the secrets service (subjects `events.secrets.<name>`).

No event carries a secret value, its ciphertext or a data key: only which secret (by id and
name), whose it is, under which master key it is wrapped, and who used it for what. The
audit trail keeps `name`, `scope`, `purpose` and `fingerprint`; it drops `secret_id` from
the metadata (a field naming a secret) but keeps it as the entry's resource id.
"""

from datetime import datetime

import msgspec


class SecretStored(msgspec.Struct, kw_only=True):
    """A value was set (version 1) or replaced (a later version)."""

    secret_id: str
    name: str
    scope: str  # "user" | "org"
    user_id: str | None  # the owner of a user secret; None for an org secret
    version: int
    fingerprint: str  # keyed HMAC of the value: equal values, equal fingerprints; no guessing
    key_id: str  # the master key that wraps this version's data key
    stored_at: datetime


class SecretRevoked(msgspec.Struct, kw_only=True):
    """The secret's data keys were destroyed: its recorded ciphertext is unreadable for good."""

    secret_id: str
    name: str
    scope: str
    user_id: str | None
    version: int
    revoked_at: datetime


class SecretRevealed(msgspec.Struct, kw_only=True):
    """A service decrypted the secret for a named purpose on behalf of a user."""

    secret_id: str
    name: str
    scope: str
    user_id: str  # on whose behalf (for an org secret: the member whose server used it)
    service: str  # "mcp_proxy" | "session_runner"
    purpose: str  # "tool_call:<id>" | "build:<id>"
    version: int
    revealed_at: datetime


class RevealDenied(msgspec.Struct, kw_only=True):
    """A reveal was refused; `reason` says why, without saying whether others' secrets exist."""

    name: str
    scope: str  # what was asked for: "user" | "org" | "any"
    user_id: str
    service: str
    purpose: str
    reason: str  # "not_found" | "revoked" | "refused" | "corrupted" | "key_unavailable"
    denied_at: datetime
    outcome: str = "denied"


class DataKeysRewrapped(msgspec.Struct, kw_only=True):
    """`gatehouse secrets rewrap`: data keys moved under the current master key."""

    key_id: str  # the current master key
    count: int
    from_key_ids: dict[str, int]  # previous master key -> data keys moved off it
    rewrapped_at: datetime


EVENTS: dict[str, type[msgspec.Struct]] = {
    "secrets.secret_stored": SecretStored,
    "secrets.secret_revoked": SecretRevoked,
    "secrets.secret_revealed": SecretRevealed,
    "secrets.reveal_denied": RevealDenied,
    "secrets.data_keys_rewrapped": DataKeysRewrapped,
}
