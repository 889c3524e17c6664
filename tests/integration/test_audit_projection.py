"""The audit trail on real NATS and PostgreSQL: identity's events become scoped, paged,
hash-chained entries, and a rebuild from the stream gives the same digest."""

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
import pytest

from contracts.commands import audit as cmd
from contracts.commands.common import CommandMeta, Empty
from contracts.commands.identity import CreateUser, IssueKey, KeyIssued, RevokeKey, UserCreated
from contracts.envelope import Actor, Envelope, encode_envelope, payload_bytes
from contracts.subjects import STREAM
from services.audit.bootstrap import build as audit_build
from services.audit.domain import PLATFORM, UNDECODABLE
from services.identity.bootstrap import build as identity_build
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.rpc import CommandClient, CommandFailed
from tests.helpers import OPERATOR, eventually, running

pytestmark = pytest.mark.integration


class Platform(msgspec.Struct):
    client: CommandClient
    bus: Bus


@pytest.fixture
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    async with (
        running(identity_build, settings, "identity") as identity_bus,
        running(audit_build, settings, "audit") as audit_bus,
    ):
        yield Platform(CommandClient(identity_bus), audit_bus)


async def page(
    client: CommandClient,
    org_id: str,
    user_id: str,
    is_admin: bool,
    limit: int = 50,
    cursor: str | None = None,
    **where: Any,
) -> cmd.AuditPage:
    request = cmd.QueryAudit(
        meta=OPERATOR,
        org_id=org_id,
        user_id=user_id,
        is_admin=is_admin,
        filter=cmd.AuditFilter(**where),
        limit=limit,
        cursor=cursor,
    )
    return await client.call("audit", "query", request, cmd.AuditPage)


async def every(
    client: CommandClient, org_id: str, user_id: str, is_admin: bool, limit: int = 500, **where: Any
) -> list[cmd.AuditEntry]:
    items: list[cmd.AuditEntry] = []
    cursor = None
    while True:
        got = await page(client, org_id, user_id, is_admin, limit, cursor, **where)
        items += got.items
        if got.next_cursor is None:
            return items
        cursor = got.next_cursor


async def create(client: CommandClient, email: str, org: str, is_admin: bool = False) -> UserCreated:
    request = CreateUser(meta=OPERATOR, email=email, org=org, is_admin=is_admin)
    return await client.call("identity", "create_user", request, UserCreated)


async def digest(client: CommandClient, verify: bool = False) -> cmd.ProjectionDigest:
    return await client.call(
        "audit", "digest", cmd.GetDigest(meta=OPERATOR, verify=verify), cmd.ProjectionDigest
    )


class World(msgspec.Struct):
    admin_a: UserCreated
    user_a: UserCreated
    admin_b: UserCreated
    laptop: KeyIssued


@pytest.fixture
async def world(platform: Platform) -> World:
    """Two orgs; user A issues and revokes a key of their own, as themselves."""
    client = platform.client
    admin_a = await create(client, "admin@alpha.test", "alpha", is_admin=True)
    user_a = await create(client, "ann@alpha.test", "alpha")
    admin_b = await create(client, "admin@beta.test", "beta", is_admin=True)
    as_ann = CommandMeta(
        actor=Actor(
            kind="user",
            id=user_a.user_id,
            key_id=user_a.key_id,
            ip="203.0.113.7",
            user_agent="Cursor/1.0",
        ),
        correlation_id="ann-1",
    )
    issue = IssueKey(meta=as_ann, user_id=user_a.user_id, name="laptop")
    laptop = await client.call("identity", "issue_key", issue, KeyIssued)
    revoke = RevokeKey(meta=as_ann, user_id=user_a.user_id, key_id=laptop.id)
    await client.call("identity", "revoke_key", revoke, Empty)

    async def revoked_is_in() -> bool:
        got = await page(client, admin_a.org_id, admin_a.user_id, True, action="api_key.revoked")
        return bool(got.items)

    await eventually(revoked_is_in)
    return World(admin_a, user_a, admin_b, laptop)


async def test_key_issue_and_revoke_are_audited_with_their_actor(platform: Platform, world: World) -> None:
    client, ann = platform.client, world.user_a
    for action in ("api_key.issued", "api_key.revoked"):
        items = (
            await page(client, ann.org_id, ann.user_id, False, action=action, resource_id=world.laptop.id)
        ).items
        assert len(items) == 1, action
        entry = items[0]
        actor = entry.actor
        assert (actor.kind, actor.id, actor.key_id) == ("user", ann.user_id, ann.key_id)
        assert entry.ip == "203.0.113.7" and actor.user_agent == "Cursor/1.0"
        assert entry.resource == cmd.AuditResource(type="api_key", id=world.laptop.id)
        assert entry.outcome == "success" and entry.correlation_id == "ann-1"
        assert entry.subject_user_id == ann.user_id
        assert "key_hash" not in entry.metadata and world.laptop.api_key not in str(entry.metadata)


async def test_each_reader_sees_only_what_they_may(platform: Platform, world: World) -> None:
    client, ann, admin_a, admin_b = platform.client, world.user_a, world.admin_a, world.admin_b
    own = await every(client, ann.org_id, ann.user_id, False)
    assert own and all(ann.user_id in (e.actor.id, e.subject_user_id) for e in own)
    assert {e.action for e in own} == {"user.registered", "api_key.issued", "api_key.revoked"}

    org_a = await every(client, admin_a.org_id, admin_a.user_id, True)
    assert {e.id for e in own} < {e.id for e in org_a}
    assert {"org.created", "user.registered"} <= {e.action for e in org_a}
    assert sum(e.action == "user.registered" for e in org_a) == 2

    org_b = await every(client, admin_b.org_id, admin_b.user_id, True)
    assert org_b and not {e.id for e in org_b} & {e.id for e in org_a}
    assert {e.subject_user_id for e in org_b} <= {admin_b.user_id, None}

    # filters
    by_actor = await every(client, admin_a.org_id, admin_a.user_id, True, actor=ann.user_id)
    assert {e.action for e in by_actor} == {"api_key.issued", "api_key.revoked"}
    users = await every(client, admin_a.org_id, admin_a.user_id, True, resource_type="user")
    assert {e.resource.id for e in users} == {admin_a.user_id, ann.user_id}
    assert await every(client, admin_a.org_id, admin_a.user_id, True, outcome="error") == []


async def test_pages_return_every_entry_once_newest_first(platform: Platform, world: World) -> None:
    client, admin = platform.client, world.admin_a
    everything = await every(client, admin.org_id, admin.user_id, True)
    paged = await every(client, admin.org_id, admin.user_id, True, limit=2)
    assert [e.id for e in paged] == [e.id for e in everything]
    assert len({e.id for e in paged}) == len(paged) == len(everything) >= 6
    assert [e.seq for e in paged] == sorted((e.seq for e in paged), reverse=True)
    assert [e.seq for e in paged] == list(range(len(paged), 0, -1))  # the org's whole chain


async def test_bad_cursors_and_limits_are_refused(platform: Platform, world: World) -> None:
    client, admin_a, admin_b = platform.client, world.admin_a, world.admin_b
    first = await page(client, admin_a.org_id, admin_a.user_id, True, limit=1)
    assert first.next_cursor
    forged = first.next_cursor[:-3] + ("AAA" if not first.next_cursor.endswith("AAA") else "BBB")
    for cursor in ("garbage", "eyJvcmciOiJ4In0.AAAA", forged):
        with pytest.raises(CommandFailed) as refused:
            await page(client, admin_a.org_id, admin_a.user_id, True, cursor=cursor)
        assert refused.value.problem.status == 400
    with pytest.raises(CommandFailed) as refused:  # org A's cursor in org B
        await page(client, admin_b.org_id, admin_b.user_id, True, cursor=first.next_cursor)
    assert refused.value.problem.status == 400
    for limit in (0, 501):
        with pytest.raises(CommandFailed) as refused:
            await page(client, admin_a.org_id, admin_a.user_id, True, limit=limit)
        assert refused.value.problem.status == 400


async def test_rebuild_gives_the_same_digest_every_time(
    platform: Platform, world: World, database_url: str
) -> None:
    client = platform.client
    before_entries = await every(client, world.admin_a.org_id, world.admin_a.user_id, True)
    live = await digest(client, verify=True)
    assert live.verified and live.broken_detail is None
    assert live.stream_seq == (await platform.bus.js.stream_info(STREAM)).state.last_seq

    first = await client.call("audit", "rebuild", cmd.Rebuild(meta=OPERATOR), cmd.RebuildReport, timeout=60)
    assert first.before.digest == first.after.digest == live.digest
    assert first.before.entries == first.after.entries == live.entries > 0
    second = await client.call("audit", "rebuild", cmd.Rebuild(meta=OPERATOR), cmd.RebuildReport, timeout=60)
    assert second.after.digest == first.after.digest
    after_entries = await every(client, world.admin_a.org_id, world.admin_a.user_id, True)
    assert [(e.id, e.hash) for e in after_entries] == [(e.id, e.hash) for e in before_entries]

    # Tampering with a stored entry shows in `verify`; a rebuild from the stream repairs it.
    victim = next(e for e in before_entries if e.action == "api_key.issued")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE audit.entries SET metadata = metadata || %s::jsonb WHERE id = %s",
            ['{"name": "innocent"}', victim.id],
        )
    tampered = await digest(client, verify=True)
    assert tampered.broken_entry == victim.id and tampered.broken_detail
    await client.call("audit", "rebuild", cmd.Rebuild(meta=OPERATOR), cmd.RebuildReport, timeout=60)
    assert (await digest(client, verify=True)).broken_detail is None


async def test_undecodable_messages_are_recorded_and_projection_goes_on(platform: Platform) -> None:
    client, js = platform.client, platform.bus.js
    await js.publish("events.junk.x", b"\xff{not json", stream=STREAM)
    bad_payload = Envelope(
        event_id="bad-1",
        type="identity.api_key_issued",
        schema_version=1,
        occurred_at=datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
        org_id="org-x",
        actor=Actor(kind="service", id="identity"),
        correlation_id="c",
        data=payload_bytes({"key_id": 1}),
    )
    await js.publish("events.identity.api_key_issued", encode_envelope(bad_payload), stream=STREAM)
    future = Envelope(
        event_id="future-1",
        type="billing.invoice_paid",
        schema_version=3,
        occurred_at=bad_payload.occurred_at,
        org_id="org-x",
        actor=Actor(kind="service", id="billing"),
        correlation_id="c",
        data=payload_bytes(
            {
                "invoice_id": "inv-9",
                "amount": 12.5,
                "card_token": "tok_123",
                # values jsonb would alter if stored naively: the chain must still verify
                "cents": 1e16,
                "refund": -0.0,
                "huge": 2**70,
                "memo": "paid\x00in full",
            }
        ),
    )
    await js.publish("events.billing.invoice_paid", encode_envelope(future), stream=STREAM)
    user = await create(client, "after@junk.test", "junk")

    async def registered() -> list[cmd.AuditEntry]:
        return await every(client, user.org_id, user.user_id, True, action="user.registered")

    assert await eventually(registered)
    platform_entries = await every(client, PLATFORM, "operator", True)
    assert [e.action for e in platform_entries] == [UNDECODABLE]
    assert platform_entries[0].metadata["subject"] == "events.junk.x"
    assert platform_entries[0].metadata["stream_seq"] == 1

    org_x = await every(client, "org-x", "operator", True)
    by_action = {e.action: e for e in org_x}
    assert by_action[UNDECODABLE].metadata["event_type"] == "identity.api_key_issued"
    paid = by_action["invoice.paid"]
    assert paid.resource == cmd.AuditResource(type="invoice", id="inv-9")
    assert paid.metadata == {
        "invoice_id": "inv-9",
        "amount": 12.5,
        "cents": 10**16,
        "refund": 0.0,
        "huge": 2**70,
        "memo": "paid\ufffdin full",
    }
    assert (await digest(client, verify=True)).broken_detail is None
