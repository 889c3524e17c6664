"""Commands answered by the audit service (`cmd.audit.<verb>`)."""

from datetime import datetime
from typing import Any

import msgspec

from contracts.commands.common import CommandMeta


class AuditFilter(msgspec.Struct, kw_only=True, omit_defaults=True):
    action: str | None = None
    actor: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class QueryAudit(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    org_id: str
    user_id: str
    is_admin: bool
    filter: AuditFilter = msgspec.field(default_factory=AuditFilter)
    limit: int = 50
    cursor: str | None = None


class AuditActor(msgspec.Struct, kw_only=True, omit_defaults=True):
    kind: str
    id: str
    key_id: str | None = None
    user_agent: str | None = None


class AuditResource(msgspec.Struct, kw_only=True):
    type: str
    id: str


class AuditEntry(msgspec.Struct, kw_only=True):
    id: str
    seq: int
    at: datetime
    actor: AuditActor
    action: str
    resource: AuditResource
    outcome: str
    ip: str | None
    metadata: dict[str, Any]
    prev_hash: str
    hash: str
    correlation_id: str | None = None
    trace_id: str | None = None
    subject_user_id: str | None = None  # the user the entry is about (may differ from the actor)


class AuditPage(msgspec.Struct):
    items: list[AuditEntry]
    next_cursor: str | None


class Rebuild(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    # Rebuild the trail as it stood at this moment into a scratch schema (`audit_until_<stamp>`),
    # leaving the live trail alone; None rebuilds the live trail.
    until: datetime | None = None


class ProjectionDigest(msgspec.Struct, kw_only=True):
    entries: int
    orgs: int
    digest: str
    stream_seq: int
    verified: bool = False  # the hash chains were walked (GetDigest.verify)
    broken_detail: str | None = None  # set when a chain is broken: which chain, entry, and why
    broken_entry: str | None = None  # id of the first bad entry, when it exists (not a gap)
    checkpoints: int = 0  # signed checkpoints the chains were held to (with `verified`)
    checkpoint_note: str | None = None  # e.g. "3 signed checkpoints hold, newest …"


class RebuildReport(msgspec.Struct, kw_only=True):
    before: ProjectionDigest
    after: ProjectionDigest
    seconds: float
    schema: str | None = None  # where a `until` rebuild put its tables
    restored: int = 0  # events the stream no longer held, read back from the services' stores
    restored_from: list[str] = msgspec.field(default_factory=list)  # services that gave some


class GetDigest(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    verify: bool = False  # also recompute every hash chain (`gatehouse audit verify`)


class SignCheckpoints(msgspec.Struct, kw_only=True):
    """Sign each org's chain head now (`gatehouse audit checkpoint`); `sweep` also applies retention."""

    meta: CommandMeta
    sweep: bool = True


class CheckpointInfo(msgspec.Struct, kw_only=True):
    org_id: str
    seq: int
    hash: str
    at: datetime
    kind: str  # "head" | "retention"
    key_id: str


class CheckpointsSigned(msgspec.Struct, kw_only=True):
    signed: list[CheckpointInfo]
    retention: list[CheckpointInfo]
    key_id: str | None = None  # None: no signing key, nothing was signed
    public_key: str | None = None  # base64 raw Ed25519 public key that checks the signatures
