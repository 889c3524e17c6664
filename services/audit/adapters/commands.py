"""Audit's commands on NATS: `query`, `digest` and `rebuild` (`cmd.audit.<verb>`)."""

from contracts.commands import audit as cmd
from services.audit.application import Audit, Replayable
from services.audit.domain import ChainBreak, Digest, Entry, InvalidQuery
from services.kit.rpc import CommandServer, refuse


def entry_view(entry: Entry) -> cmd.AuditEntry:
    a = entry.actor
    return cmd.AuditEntry(
        id=entry.id,
        seq=entry.seq,
        at=entry.at,
        actor=cmd.AuditActor(kind=a.kind, id=a.id, key_id=a.key_id, user_agent=a.user_agent),
        action=entry.action,
        resource=cmd.AuditResource(type=entry.resource_type, id=entry.resource_id),
        outcome=entry.outcome,
        ip=a.ip,
        metadata=entry.metadata,
        prev_hash=entry.prev_hash,
        hash=entry.hash,
        correlation_id=entry.correlation_id,
        trace_id=entry.trace_id,
        subject_user_id=entry.subject_user_id,
    )


def digest_view(
    digest: Digest, broken: ChainBreak | None = None, verified: bool = False
) -> cmd.ProjectionDigest:
    return cmd.ProjectionDigest(
        entries=digest.entries,
        orgs=digest.orgs,
        digest=digest.digest,
        stream_seq=digest.stream_seq,
        verified=verified,
        broken_detail=None
        if broken is None
        else (f"chain {broken.org_id}, entry {broken.seq}: {broken.reason}"),
        broken_entry=None if broken is None else broken.entry_id,
    )


def routes(server: CommandServer, audit: Audit, projection: Replayable) -> None:
    async def query(c: cmd.QueryAudit) -> cmd.AuditPage:
        try:
            page = await audit.query(c)
        except InvalidQuery as err:
            raise refuse(400, "Invalid request", str(err), code="invalid_query") from None
        return cmd.AuditPage([entry_view(e) for e in page.entries], page.next_cursor)

    async def digest(c: cmd.GetDigest) -> cmd.ProjectionDigest:
        if not c.verify:
            return digest_view(await audit.digest())
        broken = await audit.verify()
        return digest_view(await audit.digest(), broken, verified=True)

    async def rebuild(c: cmd.Rebuild) -> cmd.RebuildReport:
        done = await audit.rebuild(projection)
        return cmd.RebuildReport(
            before=digest_view(done.before), after=digest_view(done.after), seconds=done.seconds
        )

    server.route("query", cmd.QueryAudit, query)
    server.route("digest", cmd.GetDigest, digest)
    server.route("rebuild", cmd.Rebuild, rebuild)
