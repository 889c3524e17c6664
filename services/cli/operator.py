"""Operator commands that talk to a running platform over NATS."""

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

from contracts.commands import audit as audit_cmd
from contracts.commands import identity as identity_cmd
from contracts.commands import quota as quota_cmd
from contracts.commands.common import CommandMeta
from contracts.envelope import Actor, Envelope, decode_envelope
from contracts.subjects import STREAM
from services.kit.bus import Bus, connect
from services.kit.config import ConfigError, Settings
from services.kit.rpc import CommandClient

T = TypeVar("T")
OPERATOR = Actor(kind="operator", id="cli")


def _meta() -> CommandMeta:
    return CommandMeta(actor=OPERATOR, correlation_id=f"cli-{datetime.now().timestamp()}")


async def _with_bus(settings: Settings, work: Callable[[Bus], Awaitable[T]]) -> T:
    bus = await connect(settings, "cli")
    try:
        return await work(bus)
    finally:
        await bus.close()


def create_user(settings: Settings, email: str, org: str | None, tier: str, admin: bool) -> int:
    async def work(bus: Bus) -> identity_cmd.UserCreated:
        return await CommandClient(bus).call(
            "identity",
            "create_user",
            identity_cmd.CreateUser(meta=_meta(), email=email, org=org, tier=tier, is_admin=admin),
            identity_cmd.UserCreated,
        )

    created = asyncio.run(_with_bus(settings, work))
    print(f"user_id: {created.user_id}")
    print(f"org_id: {created.org_id}")
    print(f"api_key: {created.api_key}  (shown once: store it now)")
    return 0


def replay(settings: Settings, target: str) -> int:
    """`all` replays every projection (audit, quota, history); the exit code is the worst one."""
    steps = {"audit": _replay_audit, "quota": _replay_quota, "history": _replay_history}
    names = list(steps) if target == "all" else [target]
    return max(steps[name](settings) for name in names)


def _replay_quota(settings: Settings) -> int:
    async def work(bus: Bus) -> quota_cmd.QuotaRebuildReport:
        return await CommandClient(bus).call(
            "quota", "rebuild", quota_cmd.Rebuild(meta=_meta()), quota_cmd.QuotaRebuildReport, timeout=3600
        )

    report = asyncio.run(_with_bus(settings, work))
    live, rebuilt = report.live, report.rebuilt
    print(
        f"quota: live     users={live.users} reservations={live.reservations} open={live.open} "
        f"charged_calls={live.charged_calls} digest={live.digest}"
    )
    print(
        f"quota: rebuilt  users={rebuilt.users} reservations={rebuilt.reservations} open={rebuilt.open} "
        f"charged_calls={rebuilt.charged_calls} digest={rebuilt.digest} "
        f"(from the {report.source} up to notification {rebuilt.position}, {report.seconds:.2f}s)"
    )
    if live.digest != rebuilt.digest:
        for difference in report.differences:
            print(f"quota: {difference}", file=sys.stderr)
        print("quota: the rebuilt balances differ from the live ones", file=sys.stderr)
        return 1
    print("quota: rebuilt digest equals the live digest")
    return 0


def quota_verify(settings: Settings) -> int:
    """Live balances against balances rebuilt from the stream and from the store; names differences."""

    async def work(bus: Bus) -> quota_cmd.QuotaRebuildReport:
        return await CommandClient(bus).call(
            "quota", "verify", quota_cmd.Verify(meta=_meta()), quota_cmd.QuotaRebuildReport, timeout=3600
        )

    report = asyncio.run(_with_bus(settings, work))
    if report.differences:
        for difference in report.differences:
            print(f"quota: {difference}")
        count = len(report.differences)
        print(f"quota ledger differs from its event log in {count} place(s)", file=sys.stderr)
        return 1
    live = report.live
    print(
        f"quota ledger verified: {live.users} users, {live.reservations} reservations, "
        f"{live.charged_calls} charged calls, digest {live.digest} (stream and store agree)"
    )
    return 0


def _replay_projection(settings: Settings, label: str, service: str, verb: str) -> int:
    """Asks the owning service to drop its projection and rebuild it from the stream."""

    async def work(bus: Bus) -> audit_cmd.RebuildReport:
        return await CommandClient(bus).call(
            service, verb, audit_cmd.Rebuild(meta=_meta()), audit_cmd.RebuildReport, timeout=3600
        )

    report = asyncio.run(_with_bus(settings, work))
    before, after = report.before, report.after
    print(f"{label}: live     entries={before.entries} orgs={before.orgs} digest={before.digest}")
    print(
        f"{label}: rebuilt  entries={after.entries} orgs={after.orgs} digest={after.digest} "
        f"(stream seq {after.stream_seq}, {report.seconds:.2f}s)"
    )
    if report.restored:
        sources = ", ".join(report.restored_from)
        print(f"{label}: {report.restored} events the stream no longer holds were read from {sources}")
    if before.digest != after.digest:
        print(f"{label}: the rebuilt projection differs from the live one", file=sys.stderr)
        return 1
    print(f"{label}: rebuilt digest equals the live digest")
    return 0


def _replay_audit(settings: Settings) -> int:
    return _replay_projection(settings, "audit", "audit", "rebuild")


def _replay_history(settings: Settings) -> int:
    return _replay_projection(settings, "history", "mcp_proxy", "rebuild_history")


def audit_verify(settings: Settings) -> int:
    """Walks every chain and holds it to its signed checkpoints; exit 1 naming the first problem."""

    async def work(bus: Bus) -> audit_cmd.ProjectionDigest:
        return await CommandClient(bus).call(
            "audit",
            "digest",
            audit_cmd.GetDigest(meta=_meta(), verify=True),
            audit_cmd.ProjectionDigest,
            timeout=3600,
        )

    result = asyncio.run(_with_bus(settings, work))
    if result.broken_detail:
        where = f" (entry {result.broken_entry})" if result.broken_entry else ""
        print(f"audit chain broken{where}: {result.broken_detail}")
        return 1
    note = f"; {result.checkpoint_note}" if result.checkpoint_note else ""
    print(
        f"audit chain intact: {result.entries} entries in {result.orgs} chains{note}, digest {result.digest}"
    )
    return 0


def audit_checkpoint(settings: Settings, sweep: bool) -> int:
    """Signs every chain head that moved since its last checkpoint (and applies retention)."""

    async def work(bus: Bus) -> audit_cmd.CheckpointsSigned:
        request = audit_cmd.SignCheckpoints(meta=_meta(), sweep=sweep)
        return await CommandClient(bus).call(
            "audit", "checkpoint", request, audit_cmd.CheckpointsSigned, timeout=3600
        )

    result = asyncio.run(_with_bus(settings, work))
    if result.key_id is None:
        print(
            "gatehouse: the audit service has no signing key (GATEHOUSE_AUDIT_SIGNING_KEY)", file=sys.stderr
        )
        return 1
    for cp in result.retention:
        print(f"retention: {cp.org_id} entries up to seq {cp.seq} deleted (hash {cp.hash})")
    for cp in result.signed:
        print(f"signed: {cp.org_id} seq {cp.seq} hash {cp.hash}")
    print(
        f"{len(result.signed)} checkpoints signed, {len(result.retention)} retention cuts, "
        f"key {result.key_id} (public key {result.public_key})"
    )
    return 0


class TailFilter(msgspec.Struct, frozen=True):
    """`gatehouse events tail` filters beyond the subject, applied to each decoded envelope."""

    org: str | None = None
    user: str | None = None

    def keeps(self, envelope: Envelope) -> bool:
        if self.org is not None and envelope.org_id != self.org:
            return False
        if self.user is not None and envelope.actor.id != self.user:
            return self.user == _payload_user(envelope)
        return True


def _payload_user(envelope: Envelope) -> str | None:
    try:
        data = msgspec.json.decode(envelope.data)
    except msgspec.DecodeError:
        return None
    user = data.get("user_id") if isinstance(data, dict) else None
    return user if isinstance(user, str) else None


def tail_subject(subject: str) -> str:
    """The subject, or ConfigError saying why it cannot be a filter on the event stream."""
    tokens = subject.split(".")
    if tokens[0] != "events" or any(not t or " " in t for t in tokens) or ">" in tokens[:-1]:
        raise ConfigError(
            f"--subject {subject!r} is not a subject of the event stream (e.g. `events.>`, "
            "`events.identity.>`, `events.gateway.auth_failed`)"
        )
    return subject if len(tokens) > 1 else "events.>"


def events_tail(
    settings: Settings,
    subject: str,
    since: datetime | None,
    follow: bool,
    where: TailFilter | None = None,
) -> int:
    subject = tail_subject(subject)
    where = where or TailFilter()
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)  # a naive time is UTC, as everywhere else

    async def work(bus: Bus) -> None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
            opt_start_time=since,
        )
        sub = await bus.js.subscribe(subject, ordered_consumer=True, config=config, stream=STREAM)
        idle = 0.0
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                idle += 0.5
                if not follow and idle >= 1.0:
                    return
                continue
            idle = 0.0
            try:
                envelope = decode_envelope(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                if where.org is None and where.user is None:
                    undecodable = {
                        "subject": msg.subject,
                        "undecodable": True,
                        "seq": msg.metadata.sequence.stream,
                    }
                    print(msgspec.json.encode(undecodable).decode(), flush=True)
                continue
            if where.keeps(envelope):
                print(msgspec.json.encode(envelope).decode(), flush=True)

    try:
        asyncio.run(_with_bus(settings, work))
    except KeyboardInterrupt:
        pass
    return 0
