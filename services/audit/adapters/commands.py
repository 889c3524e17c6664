"""Audit's commands on NATS: `query`, `digest`, `rebuild` and `checkpoint` (`cmd.audit.<verb>`)."""

from contracts.commands import audit as cmd
from services.audit.application import Audit, Replayable
from services.audit.domain import ChainBreak, Checkpoint, Digest, Entry, InvalidQuery
from services.audit.notary import Notary
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


def checkpoint_view(cp: Checkpoint) -> cmd.CheckpointInfo:
    return cmd.CheckpointInfo(
        org_id=cp.org_id, seq=cp.seq, hash=cp.hash, at=cp.at, kind=cp.kind, key_id=cp.key_id
    )


def routes(server: CommandServer, audit: Audit, projection: Replayable, notary: Notary) -> None:
    async def query(c: cmd.QueryAudit) -> cmd.AuditPage:
        try:
            page = await audit.query(c)
        except InvalidQuery as err:
            raise refuse(400, "Invalid request", str(err), code="invalid_query") from None
        return cmd.AuditPage([entry_view(e) for e in page.entries], page.next_cursor)

    async def digest(c: cmd.GetDigest) -> cmd.ProjectionDigest:
        if not c.verify:
            return digest_view(await audit.digest())
        checked = await notary.verify()  # the hash chains, held to their signed checkpoints
        view = digest_view(await audit.digest(), checked.broken, verified=True)
        view.checkpoints, view.checkpoint_note = checked.checkpoints, checked.note()
        return view

    async def rebuild(c: cmd.Rebuild) -> cmd.RebuildReport:
        if c.until is not None:  # a past state, into a scratch schema (docs/replay.md)
            past = await audit.rebuild_until(c.until)
            view = digest_view(past.digest)
            return cmd.RebuildReport(before=view, after=view, seconds=past.seconds, schema=past.schema)
        async with notary.rebuilding():  # re-applies recorded retention before `after`
            done = await audit.rebuild(projection)
        after = await audit.digest()
        return cmd.RebuildReport(
            before=digest_view(done.before),
            after=digest_view(after),
            seconds=done.seconds,
            restored=done.restored,
            restored_from=list(done.restored_from),
        )

    async def checkpoint(c: cmd.SignCheckpoints) -> cmd.CheckpointsSigned:
        signed = await notary.sign(sweep=c.sweep)
        return cmd.CheckpointsSigned(
            signed=[checkpoint_view(cp) for cp in signed.heads],
            retention=[checkpoint_view(cp) for cp in signed.retention],
            key_id=notary.signer.key_id,
            public_key=notary.signer.public_key,
        )

    server.route("query", cmd.QueryAudit, query)
    server.route("digest", cmd.GetDigest, digest)
    server.route("rebuild", cmd.Rebuild, rebuild)
    server.route("checkpoint", cmd.SignCheckpoints, checkpoint)
