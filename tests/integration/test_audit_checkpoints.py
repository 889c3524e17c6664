"""Signed checkpoints and retention on real NATS and PostgreSQL: rows edited or deleted with
SQL are named by `verify`, retention leaves a verifiable chain, and a rebuild re-applies it."""

import base64
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec
import psycopg
import pytest

from contracts.commands import audit as cmd
from contracts.envelope import Actor, Envelope, encode_envelope, payload_bytes
from contracts.subjects import STREAM
from services.audit.bootstrap import build as audit_build
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.rpc import CommandClient
from tests.helpers import OPERATOR, eventually, running

pytestmark = pytest.mark.integration
ORG = "org-r"
OLD = datetime(2020, 1, 1, tzinfo=UTC)


class Trail(msgspec.Struct):
    client: CommandClient
    bus: Bus
    database_url: str


@pytest.fixture
async def trail(
    settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Trail]:
    monkeypatch.setenv("GATEHOUSE_AUDIT_SIGNING_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("GATEHOUSE_AUDIT_CHECKPOINT_INTERVAL_S", "0")  # on demand only, in tests
    monkeypatch.setenv("GATEHOUSE_AUDIT_RETENTION_DAYS", "30")
    async with running(audit_build, settings, "audit") as bus:
        yield Trail(CommandClient(bus), bus, database_url)


async def publish(bus: Bus, n: int, at: datetime, org: str = ORG) -> None:
    for i in range(n):
        envelope = Envelope(
            event_id=str(uuid.uuid4()),
            type="ledger.entry_posted",
            schema_version=1,
            occurred_at=at + timedelta(seconds=i),
            org_id=org,
            actor=Actor(kind="service", id="ledger"),
            correlation_id="c",
            data=payload_bytes({"entry_id": f"{at.year}-{i}"}),
        )
        await bus.js.publish("events.ledger.entry_posted", encode_envelope(envelope), stream=STREAM)


async def entries_of(trail: Trail, org: str = ORG) -> list[tuple[int, str]]:
    async with await psycopg.AsyncConnection.connect(trail.database_url) as conn:
        cur = await conn.execute("SELECT seq, hash FROM audit.entries WHERE org_id = %s ORDER BY seq", [org])
        return [(int(r[0]), str(r[1])) for r in await cur.fetchall()]


async def wait_for(trail: Trail, count: int, org: str = ORG) -> None:
    async def there() -> bool:
        async with await psycopg.AsyncConnection.connect(trail.database_url) as conn:
            cur = await conn.execute("SELECT max(seq) FROM audit.entries WHERE org_id = %s", [org])
            row = await cur.fetchone()
            return row is not None and row[0] == count

    await eventually(there, timeout=20)


async def sql(trail: Trail, statement: str, *params: object) -> None:
    async with await psycopg.AsyncConnection.connect(trail.database_url, autocommit=True) as conn:
        await conn.execute(statement, list(params))


async def sign(trail: Trail, sweep: bool = True) -> cmd.CheckpointsSigned:
    request = cmd.SignCheckpoints(meta=OPERATOR, sweep=sweep)
    return await trail.client.call("audit", "checkpoint", request, cmd.CheckpointsSigned, timeout=30)


async def verify(trail: Trail) -> cmd.ProjectionDigest:
    request = cmd.GetDigest(meta=OPERATOR, verify=True)
    return await trail.client.call("audit", "digest", request, cmd.ProjectionDigest, timeout=30)


async def test_a_deleted_tail_is_named_by_its_checkpoint(trail: Trail) -> None:
    await publish(trail.bus, 6, datetime.now(UTC))
    await wait_for(trail, 6)
    signed = await sign(trail, sweep=False)
    assert [(cp.org_id, cp.seq) for cp in signed.signed] == [(ORG, 6)] and signed.key_id
    again = await sign(trail, sweep=False)
    assert again.signed == []  # nothing moved: nothing to sign
    ok = await verify(trail)
    assert (
        ok.broken_detail is None
        and ok.checkpoints == 1
        and "1 signed checkpoints hold" in (ok.checkpoint_note or "")
    )

    # Delete the newest two entries and make the head row agree: only the checkpoint can tell.
    await sql(trail, "DELETE FROM audit.entries WHERE org_id = %s AND seq > 4", ORG)
    entries = await entries_of(trail)
    await sql(trail, "UPDATE audit.chain_heads SET seq = 4, hash = %s WHERE org_id = %s", entries[-1][1], ORG)
    broken = await verify(trail)
    assert broken.broken_detail is not None
    assert "entries after seq 4 are missing: head checkpoint at" in broken.broken_detail
    assert "covered up to seq 6" in broken.broken_detail


async def test_a_rewritten_entry_or_a_forged_checkpoint_is_caught(trail: Trail) -> None:
    await publish(trail.bus, 3, datetime.now(UTC))
    await wait_for(trail, 3)
    await sign(trail, sweep=False)
    await sql(trail, "UPDATE audit.checkpoints SET seq = 2 WHERE org_id = %s", ORG)
    broken = await verify(trail)
    assert broken.broken_detail and "signature that does not match" in broken.broken_detail
    await sql(trail, "UPDATE audit.checkpoints SET seq = 3 WHERE org_id = %s", ORG)
    assert (await verify(trail)).broken_detail is None

    await sql(
        trail, 'UPDATE audit.entries SET metadata = \'{"entry_id": "x"}\' WHERE org_id = %s AND seq = 2', ORG
    )
    broken = await verify(trail)
    assert broken.broken_detail and "entry 2: content does not match its hash" in broken.broken_detail


async def test_retention_deletes_a_prefix_that_stays_verifiable_and_survives_a_rebuild(trail: Trail) -> None:
    await publish(trail.bus, 4, OLD)
    await publish(trail.bus, 3, datetime.now(UTC))
    await wait_for(trail, 7)
    before = await entries_of(trail)

    signed = await sign(trail)
    assert [(cp.org_id, cp.seq, cp.hash) for cp in signed.retention] == [(ORG, 4, before[3][1])]
    assert [(cp.org_id, cp.seq) for cp in signed.signed] == [(ORG, 7)]
    assert await entries_of(trail) == before[4:]
    ok = await verify(trail)
    assert ok.broken_detail is None and ok.entries == 3

    rebuilt = await trail.client.call(
        "audit", "rebuild", cmd.Rebuild(meta=OPERATOR), cmd.RebuildReport, timeout=60
    )
    assert rebuilt.before.digest == rebuilt.after.digest and rebuilt.after.entries == 3
    assert await entries_of(trail) == before[4:]  # the stream still has them; retention holds
    assert (await verify(trail)).broken_detail is None

    # Deleting one more entry by hand is not retention: it is named.
    await sql(trail, "DELETE FROM audit.entries WHERE org_id = %s AND seq = 5", ORG)
    broken = await verify(trail)
    assert broken.broken_detail and "entries 5 to 5 are missing" in broken.broken_detail
