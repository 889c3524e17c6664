"""Replaying the audit trail: after SIGKILLs of the audit service, at a past moment, and after
the stream's retention dropped old events (the services' own stores fill the gap).

The audit service runs as a real OS process where a crash matters; identity runs in the
test's event loop. Digests are compared, never timings.
"""

import asyncio
import itertools
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from nats.js.errors import NotFoundError

from contracts.commands import audit as cmd
from contracts.commands import secrets as secrets_cmd
from contracts.commands.identity import CreateUser, IssueKey, KeyIssued, UserCreated
from contracts.envelope import Actor, Envelope, encode_envelope, payload_bytes
from contracts.events.identity import ApiKeyUsed
from contracts.subjects import STREAM
from services.audit.bootstrap import build as audit_build
from services.identity.bootstrap import build as identity_build
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.rpc import CommandClient
from services.secrets.bootstrap import build as secrets_build
from tests.helpers import (
    OPERATOR,
    eventually,
    running,
    spawn_service,
    stop_process,
    stream_envelopes,
    stream_messages,
    wait_ready,
)
from tests.integration.secrets_world import secrets_settings

pytestmark = pytest.mark.integration

SETTLE = 120.0  # a killed audit keeps its projection lease until the KV entry expires (10 s)
Spawn = Callable[[str], subprocess.Popen[bytes]]


@pytest.fixture
def spawn_audit(service_env: dict[str, str], tmp_path: Path) -> Iterator[Spawn]:
    started: list[subprocess.Popen[bytes]] = []

    def start(log_name: str) -> subprocess.Popen[bytes]:
        process = spawn_service("audit", service_env, tmp_path / log_name)
        started.append(process)
        return process

    yield start
    for process in started:
        stop_process(process)


@pytest.fixture
async def identity(settings: Settings) -> AsyncIterator[Bus]:
    async with running(identity_build, settings, "identity") as bus:
        yield bus


async def digest(client: CommandClient, verify: bool = False) -> cmd.ProjectionDigest:
    request = cmd.GetDigest(meta=OPERATOR, verify=verify)
    return await client.call("audit", "digest", request, cmd.ProjectionDigest, timeout=60)


async def rebuild(client: CommandClient, **options: object) -> cmd.RebuildReport:
    request = cmd.Rebuild(meta=OPERATOR, **options)  # type: ignore[arg-type]
    return await client.call("audit", "rebuild", request, cmd.RebuildReport, timeout=600)


async def caught_up(client: CommandClient, bus: Bus) -> bool:
    last = (await bus.js.stream_info(STREAM)).state.last_seq
    try:
        return (await digest(client)).stream_seq == last
    except Exception:
        return False


async def settled(client: CommandClient, bus: Bus) -> None:
    """The relay has published everything (the stream stops growing) and audit has applied it."""

    async def still() -> bool:
        before = (await bus.js.stream_info(STREAM)).state.last_seq
        await asyncio.sleep(0.3)
        return before == (await bus.js.stream_info(STREAM)).state.last_seq and await caught_up(client, bus)

    await eventually(still, timeout=SETTLE)


async def publish_usage(bus: Bus, count: int, org_id: str, user_id: str) -> None:
    """`count` api_key_used events, published as fast as JetStream takes them."""
    start = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
    for i in range(count):
        envelope = Envelope(
            event_id=str(uuid.uuid4()),
            type="identity.api_key_used",
            schema_version=1,
            occurred_at=start + timedelta(milliseconds=i),
            org_id=org_id,
            actor=Actor(kind="user", id=user_id),
            correlation_id=f"burst-{i}",
            data=payload_bytes(ApiKeyUsed(key_id=f"k-{i % 7}", user_id=user_id, used_at=start)),
        )
        await bus.js.publish_async(
            "events.identity.api_key_used",
            encode_envelope(envelope),
            headers={"Nats-Msg-Id": envelope.event_id},
        )
    await bus.js.publish_async_completed()


async def test_replay_after_sigkills_mid_stream_equals_the_live_trail(
    identity: Bus, spawn_audit: Spawn
) -> None:
    client = CommandClient(identity)
    admin = await client.call(
        "identity",
        "create_user",
        CreateUser(meta=OPERATOR, email="admin@crash.test", org="crash", is_admin=True),
        UserCreated,
    )
    audit = spawn_audit("audit-1.log")
    await wait_ready(identity, "audit")
    for round_ in range(3):
        # A burst the projection is still working through when it is killed.
        await publish_usage(identity, 4000, admin.org_id, admin.user_id)
        for i in range(5):
            email = f"u{round_}-{i}@crash.test"
            user = await client.call(
                "identity", "create_user", CreateUser(meta=OPERATOR, email=email, org="crash"), UserCreated
            )
            issue = IssueKey(meta=OPERATOR, user_id=user.user_id, name=f"key-{i}")
            await client.call("identity", "issue_key", issue, KeyIssued)
        last = (await identity.js.stream_info(STREAM)).state.last_seq

        async def partly_applied(limit: int = last) -> bool:
            try:
                return 0 < (await digest(client)).stream_seq < limit
            except Exception:
                return False

        await eventually(partly_applied, timeout=SETTLE, step=0.01)
        audit.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(audit.wait, 15) == -signal.SIGKILL
        audit = spawn_audit(f"audit-{round_ + 2}.log")
        await wait_ready(identity, "audit")

    await eventually(lambda: caught_up(client, identity), timeout=SETTLE, step=0.2)
    live = await digest(client, verify=True)
    assert live.broken_detail is None and live.entries == live.stream_seq  # each event once

    first = await rebuild(client)
    second = await rebuild(client)
    assert first.before.digest == live.digest
    assert first.after.digest == second.after.digest == live.digest
    assert second.after.entries == live.entries
    assert (await digest(client, verify=True)).broken_detail is None


@pytest.fixture
async def platform(settings: Settings) -> AsyncIterator[CommandClient]:
    async with (
        running(identity_build, settings, "identity") as identity_bus,
        running(audit_build, settings, "audit"),
    ):
        yield CommandClient(identity_bus)


async def create_users(client: CommandClient, prefix: str, count: int) -> None:
    for i in range(count):
        request = CreateUser(meta=OPERATOR, email=f"{prefix}{i}@replay.test", org=f"org-{i % 2}")
        user = await client.call("identity", "create_user", request, UserCreated)
        await client.call(
            "identity", "issue_key", IssueKey(meta=OPERATOR, user_id=user.user_id, name="k"), KeyIssued
        )


async def test_until_rebuilds_a_past_state_beside_the_live_trail(
    platform: CommandClient, settings: Settings, database_url: str
) -> None:
    client, bus = platform, platform.bus
    await create_users(client, "early", 6)
    await settled(client, bus)
    then = await digest(client)
    await asyncio.sleep(0.05)
    moment = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await create_users(client, "late", 4)
    await settled(client, bus)
    live = await digest(client)
    assert live.entries > then.entries

    past = await rebuild(client, until=moment)
    assert past.schema == "audit_until_" + moment.strftime("%Y%m%dt%H%M%Sz")
    assert past.after.digest == then.digest and past.after.entries == then.entries
    assert past.after.stream_seq == then.stream_seq
    assert (await digest(client)).digest == live.digest  # the live trail is untouched
    again = await rebuild(client, until=moment)  # the same moment again starts afresh
    assert again.after.digest == then.digest
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {past.schema}.entries")
        row = await cur.fetchone()
        assert row is not None and row[0] == then.entries
    before_anything = await rebuild(client, until=moment - timedelta(days=365))
    assert before_anything.after.entries == 0


async def test_events_dropped_by_retention_are_restored_from_the_stores(platform: CommandClient) -> None:
    client, bus = platform, platform.bus
    await create_users(client, "kept", 8)
    await settled(client, bus)
    live = await digest(client, verify=True)
    assert live.broken_detail is None

    dropped = live.stream_seq // 2
    await bus.js.purge_stream(STREAM, seq=dropped + 1)  # what max-age/max-bytes retention does
    state = (await bus.js.stream_info(STREAM)).state
    assert state.first_seq == dropped + 1 and state.messages == live.stream_seq - dropped

    first = await rebuild(client)
    assert first.restored == dropped and first.restored_from == ["identity"]
    assert first.after.digest == first.before.digest == live.digest
    second = await rebuild(client)
    assert second.after.digest == live.digest and second.restored == dropped
    assert (await digest(client, verify=True)).broken_detail is None

    # Without the stores the trail would be short: what the stream alone holds.
    assert first.after.entries == live.entries > state.messages


@pytest.fixture
async def two_stores(service_env: dict[str, str], tmp_path: Path) -> AsyncIterator[CommandClient]:
    """identity and secrets (each with its store and outbox relay) and audit, in-process."""
    settings, _ = secrets_settings(service_env, tmp_path)
    async with (
        running(identity_build, settings, "identity") as identity_bus,
        running(secrets_build, settings, "secrets"),
        running(audit_build, settings, "audit"),
    ):
        yield CommandClient(identity_bus)


async def on_stream(bus: Bus, subject: str, marker: str) -> None:
    """Waits until the newest message on `subject` names `marker`: the relay published it."""

    async def published() -> bool:
        try:
            msg = await bus.js.get_last_msg(STREAM, subject)
        except NotFoundError:
            return False
        return marker.encode() in (msg.data or b"")

    await eventually(published, timeout=30)


async def audit_rows(database_url: str) -> list[tuple[object, ...]]:
    """The whole trail in stream order: where each event sits, in which chain, with its hash."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT stream_seq, id, org_id, seq, action, hash FROM audit.entries ORDER BY stream_seq"
        )
        return list(await cur.fetchall())


async def test_events_dropped_from_two_services_are_merged_back_in_stream_order(
    two_stores: CommandClient, database_url: str
) -> None:
    """The dropped prefix holds identity's and secrets' events, interleaved: the rebuilt trail
    must hold them where the stream had them, in the same chains, with the same hashes."""
    client, bus = two_stores, two_stores.bus
    # Each command's events reach the stream before the other service acts: the stream's
    # interleaving is then the order things happened in (docs/replay.md states the limit).
    for i in range(6):
        org = f"merge-{i % 2}"
        request = CreateUser(meta=OPERATOR, email=f"m{i}@merge.test", org=org)
        user = await client.call("identity", "create_user", request, UserCreated)
        await on_stream(bus, "events.identity.api_key_issued", user.key_id)
        put = secrets_cmd.PutSecret(
            meta=OPERATOR, org_id=user.org_id, user_id=user.user_id, name=f"token-{i}", value=f"v-{i}"
        )
        await client.call("secrets", "put", put, secrets_cmd.SecretView)
        await on_stream(bus, "events.secrets.secret_stored", f"token-{i}")
        issue = IssueKey(meta=OPERATOR, user_id=user.user_id, name=f"second-{i}")
        key = await client.call("identity", "issue_key", issue, KeyIssued)
        await on_stream(bus, "events.identity.api_key_issued", key.id)
        org_put = secrets_cmd.PutSecret(
            meta=OPERATOR,
            org_id=user.org_id,
            user_id=user.user_id,
            scope="org",
            name=f"shared-{i}",
            value="s",
        )
        await client.call("secrets", "put", org_put, secrets_cmd.SecretView)
        await on_stream(bus, "events.secrets.secret_stored", f"shared-{i}")
    await settled(client, bus)
    live = await digest(client, verify=True)
    assert live.broken_detail is None and live.entries == live.stream_seq
    live_rows = await audit_rows(database_url)

    dropped = live.stream_seq // 2
    services = [m.subject.split(".")[1] for m in await stream_messages(bus) if m.seq <= dropped]
    assert len(services) == dropped and set(services) == {"identity", "secrets"}
    switches = sum(a != b for a, b in itertools.pairwise(services))
    assert switches >= 6  # interleaved, not one service's block after the other's
    await bus.js.purge_stream(STREAM, seq=dropped + 1)
    state = (await bus.js.stream_info(STREAM)).state
    assert state.first_seq == dropped + 1 and state.messages == live.stream_seq - dropped

    for _ in range(2):
        rebuilt = await rebuild(client)
        assert rebuilt.restored == dropped and rebuilt.restored_from == ["identity", "secrets"]
        assert rebuilt.before.digest == rebuilt.after.digest == live.digest
        assert rebuilt.after.entries == live.entries > state.messages
        assert await audit_rows(database_url) == live_rows  # each entry at its stream seq, in its chain
        assert (await digest(client, verify=True)).broken_detail is None


async def test_a_service_the_stream_kept_nothing_of_is_restored_up_to_what_its_relay_published(
    two_stores: CommandClient, database_url: str
) -> None:
    """With none of its events left on the stream, a service answers up to its relay's position,
    not only up to its bookmark, which is written at most once a second and may not hold the
    newest published event yet (the rebuild here comes well within that second)."""
    client, bus = two_stores, two_stores.bus
    create = CreateUser(meta=OPERATOR, email="solo@merge.test", org="solo")
    user = await client.call("identity", "create_user", create, UserCreated)
    await on_stream(bus, "events.identity.api_key_issued", user.key_id)
    put = secrets_cmd.PutSecret(
        meta=OPERATOR, org_id=user.org_id, user_id=user.user_id, name="last", value="v"
    )
    await client.call("secrets", "put", put, secrets_cmd.SecretView)
    await on_stream(bus, "events.secrets.secret_stored", "last")
    dropped = (await bus.js.stream_info(STREAM)).state.last_seq
    issue = IssueKey(meta=OPERATOR, user_id=user.user_id, name="after")
    key = await client.call("identity", "issue_key", issue, KeyIssued)
    await on_stream(bus, "events.identity.api_key_issued", key.id)
    await eventually(lambda: caught_up(client, bus), timeout=SETTLE, step=0.01)
    live = await digest(client, verify=True)
    assert live.broken_detail is None and live.stream_seq == dropped + 1
    live_rows = await audit_rows(database_url)

    await bus.js.purge_stream(STREAM, seq=dropped + 1)
    with pytest.raises(NotFoundError):
        await bus.js.get_last_msg(STREAM, "events.secrets.>")  # the stream kept none of secrets'
    rebuilt = await rebuild(client)
    assert rebuilt.restored == dropped and rebuilt.restored_from == ["identity", "secrets"]
    assert rebuilt.after.digest == live.digest
    assert await audit_rows(database_url) == live_rows


async def test_a_replay_prepared_in_worker_processes_equals_the_live_trail(
    identity: Bus, spawn_audit: Spawn, service_env: dict[str, str], tmp_path: Path
) -> None:
    """The live trail is made in the service process alone; a replay whose entries are
    prepared in a worker process (a long catch-up) must give the same trail, poison included."""
    client = CommandClient(identity)
    admin = await client.call(
        "identity",
        "create_user",
        CreateUser(meta=OPERATOR, email="admin@workers.test", org="workers", is_admin=True),
        UserCreated,
    )
    service_env["GATEHOUSE_AUDIT_REPLAY_WORKER_FROM"] = "0"
    audit = spawn_audit("audit-alone.log")
    await wait_ready(identity, "audit")
    await publish_usage(identity, 3000, admin.org_id, admin.user_id)
    # The same event again, past JetStream's dedupe (another message id), in a later batch:
    # the trail keeps it once; a staged catch-up cannot know it and hands over to the
    # durable consumer, which does.
    again = (await stream_envelopes(identity, "events.identity.api_key_used"))[10]
    await identity.js.publish("events.identity.api_key_used", b"\xff not an envelope")
    await publish_usage(identity, 3000, admin.org_id, admin.user_id)
    await identity.js.publish(
        "events.identity.api_key_used", encode_envelope(again), headers={"Nats-Msg-Id": "again"}
    )
    await publish_usage(identity, 5, admin.org_id, admin.user_id)  # the digest names the last entry
    await eventually(lambda: caught_up(client, identity), timeout=SETTLE, step=0.2)
    live = await digest(client, verify=True)
    assert live.broken_detail is None and live.entries == live.stream_seq - 1
    stop_process(audit)

    service_env["GATEHOUSE_AUDIT_REPLAY_WORKER_FROM"] = "1000"
    spawn_audit("audit-workers.log")
    await wait_ready(identity, "audit")
    rebuilt = await rebuild(client)
    assert rebuilt.before.digest == rebuilt.after.digest == live.digest
    assert (await digest(client, verify=True)).broken_detail is None
    log = (tmp_path / "audit-workers.log").read_text()
    assert "stages its catch-up in a worker process" in log  # the rebuild took the worker path
    assert "UniqueViolation" in log  # and met the duplicate, which the durable consumer kept once
