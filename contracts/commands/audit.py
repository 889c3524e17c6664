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


class ProjectionDigest(msgspec.Struct, kw_only=True):
    entries: int
    orgs: int
    digest: str
    stream_seq: int
    verified: bool = False  # the hash chains were walked (GetDigest.verify)
    broken_detail: str | None = None  # set when a chain is broken: which chain, entry, and why
    broken_entry: str | None = None  # id of the first bad entry, when it exists (not a gap)


class RebuildReport(msgspec.Struct, kw_only=True):
    before: ProjectionDigest
    after: ProjectionDigest
    seconds: float


class GetDigest(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    verify: bool = False  # also recompute every hash chain (`gatehouse audit verify`)
