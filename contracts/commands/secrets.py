"""Commands answered by the secrets service (`cmd.secrets.<verb>`).

A value travels in exactly two messages: `PutSecret` (gateway -> secrets) and the reply to
`RevealSecret` (secrets -> mcp_proxy or session_runner). In production NATS runs with TLS,
and the NATS server lets only mcp_proxy and session_runner publish `cmd.secrets.reveal`
(docs/secrets.md).

Scopes: a "user" secret belongs to one user and only they address it, by name; an "org"
secret belongs to an org, is set by its admins and may be used by every member's servers.
"""

from datetime import datetime
from typing import Literal

import msgspec

from contracts.commands.common import CommandMeta

Scope = Literal["user", "org"]
Lookup = Literal["user", "org", "any"]  # "any": the user's own secret, else the org's

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
MAX_VALUE_BYTES = 16 * 1024
REVEAL_VERB = "reveal"  # subject `cmd.secrets.reveal`
REVEALERS = {"mcp_proxy": "tool_call", "session_runner": "build"}  # service -> purpose kind


class PutSecret(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str
    user_id: str  # who sets it (the owner of a user secret; the admin for an org secret)
    scope: Scope = "user"
    name: str
    value: str


class SecretView(msgspec.Struct, kw_only=True):
    """Metadata only; there is no field a value could travel in."""

    name: str
    scope: Scope
    fingerprint: str
    key_id: str  # the master key its data key is wrapped under now
    version: int
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None = None


class ListSecrets(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str
    user_id: str
    scope: Lookup = "user"  # "any": the user's secrets and the org's


class SecretList(msgspec.Struct):
    secrets: list[SecretView]


class GetSecret(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str
    user_id: str
    scope: Scope = "user"
    name: str


class DeleteSecret(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str
    user_id: str
    scope: Scope = "user"
    name: str


class RevealSecret(msgspec.Struct, kw_only=True):
    """Decrypt a secret for one use. `meta.actor` is the calling service."""

    meta: CommandMeta
    service: str  # "mcp_proxy" | "session_runner" (the NATS server enforces who may send this)
    purpose: str  # "tool_call:<id>" (mcp_proxy) | "build:<id>" (session_runner)
    org_id: str
    user_id: str  # on whose behalf
    name: str
    scope: Lookup = "any"


class RevealedSecret(msgspec.Struct, kw_only=True):
    name: str
    scope: Scope
    version: int
    value: str


class Rewrap(msgspec.Struct, kw_only=True):
    meta: CommandMeta


class RewrapReport(msgspec.Struct, kw_only=True):
    key_id: str  # the current master key
    rewrapped: int
    already_current: int
    from_key_ids: dict[str, int]
    seconds: float
    unreadable: dict[str, int] = msgspec.field(default_factory=dict)  # kid -> keys left as they were


class KeyStatus(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    reload: bool = False  # re-read the keyring (after `gatehouse keys rotate` / `retire`)


class KeyUsage(msgspec.Struct, kw_only=True):
    key_id: str
    data_keys: int  # data keys (and service keys) wrapped under it
    current: bool
    known: bool  # False: this service does not hold it (retired or missing)
    secrets: list[str] = msgspec.field(default_factory=list)  # a sample: "scope:name" (max 20)


class KeyReport(msgspec.Struct, kw_only=True):
    current_key_id: str
    keys: list[KeyUsage]
