"""Quota's commands on NATS (`cmd.quota.<verb>`): reserve, commit, release, get, digest, rebuild."""

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from contracts.commands import quota as cmd
from contracts.commands.common import CommandMeta
from services.kit.rpc import CommandServer, refuse
from services.quota.application import Quota, Rebuilt, Source, Unavailable
from services.quota.domain import (
    Decision,
    Invalid,
    Settlement,
    Snapshot,
    UnknownTier,
    UnknownUser,
    fingerprint,
)

T = TypeVar("T")


def meta_dict(meta: CommandMeta) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(meta)
    return out


async def _run(work: Awaitable[T]) -> T:
    try:
        return await work
    except Invalid as err:
        raise refuse(400, "Invalid request", str(err), code="invalid_reservation") from None
    except UnknownUser as err:
        raise refuse(404, "Not found", str(err), code="unknown_user") from None
    except UnknownTier as err:
        raise refuse(503, "Service unavailable", str(err), code="tier_not_configured") from None
    except Unavailable as err:
        raise refuse(503, "Service unavailable", str(err), code="quota_unavailable") from None


MAX_USES = 1000  # per RecordUsage message


def reservation_view(
    d: Decision, unmetered_grant_s: float = 0.0, lease_for_s: float = 0.0
) -> cmd.Reservation:
    unmetered = d.granted and d.kind == "call" and d.limit is None and unmetered_grant_s > 0
    lease = d.reservation if d.reservation is not None and d.reservation.lease else None
    return cmd.Reservation(
        granted=d.granted,
        reservation_id=d.reservation.reservation_id if d.reservation else None,
        state=d.state,  # type: ignore[arg-type]
        kind=d.kind,
        used=d.used,
        limit=d.limit,
        tier=d.tier,
        period_start=d.period_start,
        sentence=d.sentence,
        retry_after_s=d.retry_after_s,
        unmetered_for_s=unmetered_grant_s if unmetered else None,
        lease_key=lease.key if lease else None,
        lease_units=lease.amount if lease else None,
        lease_for_s=lease_for_s if lease else None,
    )


def settled_view(s: Settlement) -> cmd.Settled:
    return cmd.Settled(changed=s.changed, state=s.state)  # type: ignore[arg-type]


def digest_view(snap: Snapshot) -> cmd.QuotaDigest:
    f = fingerprint(snap)
    return cmd.QuotaDigest(
        users=f.users,
        reservations=f.reservations,
        open=f.open,
        charged_calls=f.charged_calls,
        digest=f.digest,
        position=f.position,
    )


def report_view(done: Rebuilt, differences: list[str] | None = None) -> cmd.QuotaRebuildReport:
    return cmd.QuotaRebuildReport(
        live=digest_view(done.live),
        rebuilt=digest_view(done.rebuilt),
        source=done.source,
        seconds=done.seconds,
        differences=done.differences if differences is None else differences,
    )


def routes(server: CommandServer, quota: Quota, sources: dict[str, Source]) -> None:
    async def reserve(c: cmd.Reserve) -> cmd.Reservation:
        meta = meta_dict(c.meta)
        decision = await _run(quota.reserve(c.user_id, c.org_id, c.kind, c.key, c.amount, meta, c.lease))
        return reservation_view(decision, quota.settings.unmetered_grant_s, quota.settings.lease_for_s)

    async def record_usage(c: cmd.RecordUsage) -> cmd.UsageReceipt:
        if len(c.uses) > MAX_USES:
            raise refuse(400, "Invalid request", f"At most {MAX_USES} uses per message, got {len(c.uses)}.")
        if len(c.returned) > MAX_USES:
            detail = f"At most {MAX_USES} returned leases per message, got {len(c.returned)}."
            raise refuse(400, "Invalid request", detail)
        returned = [(r.user_id, r.key) for r in c.returned]
        recorded, unknown = await _run(quota.record_usage(c.uses, meta_dict(c.meta), returned))
        return cmd.UsageReceipt(recorded=recorded, unknown_users=unknown)

    async def commit(c: cmd.Commit) -> cmd.Settled:
        return settled_view(await _run(quota.commit(c.user_id, c.key, meta_dict(c.meta))))

    async def release(c: cmd.Release) -> cmd.Settled:
        return settled_view(await _run(quota.release(c.user_id, c.key, c.reason, meta_dict(c.meta))))

    async def get(c: cmd.GetQuota) -> cmd.QuotaView:
        u = await _run(quota.usage(c.user_id, c.org_id))
        return cmd.QuotaView(
            tier=u.tier,
            period_start=u.period_start,
            period_end=u.period_end,
            calls_used=u.calls_used,
            calls_limit=u.calls_limit,
            concurrent_builds_used=u.builds_used,
            concurrent_builds_limit=u.builds_limit,
            servers_used=u.servers_used,
            servers_limit=u.servers_limit,
        )

    async def digest(c: cmd.GetDigest) -> cmd.QuotaDigest:
        return digest_view(await _run(quota.live_snapshot()))

    async def rebuild(c: cmd.Rebuild) -> cmd.QuotaRebuildReport:
        return report_view(await _run(quota.rebuild(sources[c.source])))

    async def verify(c: cmd.Verify) -> cmd.QuotaRebuildReport:
        """Both logs; the report carries the stream's digest and every difference either shows."""
        from_stream = await _run(quota.rebuild(sources["stream"]))
        from_store = await _run(quota.rebuild(sources["store"]))
        named = [f"stream: {d}" for d in from_stream.differences]
        named += [f"store: {d}" for d in from_store.differences]
        return report_view(from_stream, named)

    handlers: dict[str, tuple[type[Any], Callable[[Any], Awaitable[Any]]]] = {
        "reserve": (cmd.Reserve, reserve),
        "commit": (cmd.Commit, commit),
        "release": (cmd.Release, release),
        "record_usage": (cmd.RecordUsage, record_usage),
        "get": (cmd.GetQuota, get),
        "digest": (cmd.GetDigest, digest),
        "rebuild": (cmd.Rebuild, rebuild),
        "verify": (cmd.Verify, verify),
    }
    for verb, (request_type, handler) in handlers.items():
        server.route(verb, request_type, handler)
