"""ProjectionConsumer on real JetStream and PostgreSQL: exactly once, in stream order.

The test projection inserts one row per event with the event id as primary key and no
ON CONFLICT, so applying an event twice would fail loudly instead of passing unnoticed.
"""

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from contracts.envelope import Actor, Envelope, encode_envelope, payload_bytes
from contracts.events.identity import OrgCreated
from contracts.subjects import STREAM
from services.kit.bus import Bus, connect, ensure_stream
from services.kit.config import load_settings
from services.kit.embedded import EmbeddedNats
from services.kit.projection import Delivered, ProjectionConsumer
from tests.helpers import eventually

pytestmark = pytest.mark.integration

SCHEMA = "proj_test"
NAME = "proj_test"
SETTLE = 60.0


class Applied:
    """A failing-at-first handler and a record of every call it got."""

    def __init__(self, fail_first: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[int, str]] = []
        self.fail_first = dict(fail_first or {})
        self.failures: Counter[str] = Counter()

    async def __call__(self, conn: psycopg.AsyncConnection[Any], d: Delivered) -> None:
        assert d.envelope is not None, d.error
        event_id = d.envelope.event_id
        self.calls.append((d.stream_seq, event_id))
        if self.failures[event_id] < self.fail_first.get(event_id, 0):
            self.failures[event_id] += 1
            raise RuntimeError(f"handler fails on {event_id} (attempt {self.failures[event_id]})")
        await conn.execute(
            "INSERT INTO proj_test.applied (event_id, stream_seq, type) VALUES (%s, %s, %s)",
            [event_id, d.stream_seq, d.envelope.type],
        )
        await conn.execute("UPDATE proj_test.counter SET n = n + 1")


async def reset(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("TRUNCATE proj_test.applied")
    await conn.execute("UPDATE proj_test.counter SET n = 0")


@pytest.fixture
def bus(stream_bus: Bus) -> Bus:
    return stream_bus


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await conn.execute(f"CREATE SCHEMA {SCHEMA}")
    await conn.execute(
        "CREATE TABLE proj_test.applied ("
        " event_id text PRIMARY KEY,"
        " stream_seq bigint NOT NULL,"
        " type text NOT NULL,"
        " applied_order bigint GENERATED ALWAYS AS IDENTITY)"
    )
    await conn.execute("CREATE TABLE proj_test.counter (n bigint NOT NULL)")
    await conn.execute("INSERT INTO proj_test.counter VALUES (0)")
    yield conn
    await conn.close()


Factory = Callable[..., ProjectionConsumer]


@pytest.fixture
async def consumers(bus: Bus, database_url: str) -> AsyncIterator[Factory]:
    made: list[ProjectionConsumer] = []

    def make(apply: Applied, batch: int = 10) -> ProjectionConsumer:
        consumer = ProjectionConsumer(
            bus=bus,
            database_url=database_url,
            schema=SCHEMA,
            name=NAME,
            filter_subject="events.>",
            apply=apply,
            batch=batch,
        )
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        await consumer.stop()


async def publish(bus: Bus, count: int) -> list[tuple[int, str]]:
    """Publishes `count` valid envelopes; returns their (stream seq, event id)."""
    out = []
    for _ in range(count):
        org_id = str(uuid.uuid4())
        envelope = Envelope(
            event_id=str(uuid.uuid4()),
            type="identity.org_created",
            schema_version=1,
            occurred_at=datetime.now(UTC),
            org_id=org_id,
            actor=Actor(kind="service", id="test"),
            correlation_id="test",
            data=payload_bytes(OrgCreated(org_id=org_id, name=org_id[:8])),
        )
        ack = await bus.js.publish(
            "events.identity.org_created",
            encode_envelope(envelope),
            stream=STREAM,
            headers={"Nats-Msg-Id": envelope.event_id},
        )
        assert not ack.duplicate
        out.append((ack.seq, envelope.event_id))
    return out


async def rows(db: psycopg.AsyncConnection[Any]) -> list[tuple[str, int]]:
    cur = await db.execute("SELECT event_id, stream_seq FROM proj_test.applied ORDER BY applied_order")
    return [(r[0], int(r[1])) for r in await cur.fetchall()]


async def counter(db: psycopg.AsyncConnection[Any]) -> int:
    cur = await db.execute("SELECT n FROM proj_test.counter")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def stored_position(db: psycopg.AsyncConnection[Any]) -> int:
    cur = await db.execute("SELECT stream_seq FROM proj_test.projection_positions WHERE name = %s", [NAME])
    row = await cur.fetchone()
    return int(row[0]) if row else 0


def reached(db: psycopg.AsyncConnection[Any], seq: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return await stored_position(db) >= seq
        except psycopg.errors.UndefinedTable:
            return False

    return check


async def assert_exactly_once_in_order(
    db: psycopg.AsyncConnection[Any], published: list[tuple[int, str]]
) -> None:
    applied = await rows(db)
    ids = [event_id for event_id, _ in applied]
    duplicated = [event_id for event_id, n in Counter(ids).items() if n > 1]
    assert not duplicated
    assert set(ids) == {event_id for _, event_id in published}, "an event was lost"
    # Insertion order is stream order, and each row carries the right stream sequence.
    assert [(event_id, seq) for seq, event_id in published] == applied
    assert await counter(db) == len(published)
    assert await stored_position(db) == published[-1][0]


async def test_failing_handler_is_redelivered_and_applied_once_in_order(
    bus: Bus, db: psycopg.AsyncConnection[Any], consumers: Factory
) -> None:
    published = await publish(bus, 45)
    target_seq, target = published[22]
    apply = Applied(fail_first={target: 2})
    consumer = consumers(apply, batch=10)
    await consumer.start()
    published += await publish(bus, 25)  # some arrive while the consumer is retrying

    await eventually(reached(db, published[-1][0]), timeout=SETTLE, step=0.1)
    await consumer.wait_caught_up(timeout=SETTLE)
    await assert_exactly_once_in_order(db, published)

    assert apply.failures[target] == 2
    target_calls = [seq for seq, event_id in apply.calls if event_id == target]
    assert target_calls == [target_seq] * 3  # two failures, then applied
    # Nothing after the failing event was applied before it finally went through.
    first_success = [i for i, (_, e) in enumerate(apply.calls) if e == target][2]
    assert max(seq for seq, _ in apply.calls[:first_success]) <= target_seq
    assert await consumer.position() == published[-1][0]
    info = await bus.js.consumer_info(STREAM, NAME)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0


async def test_a_new_consumer_with_the_same_name_resumes_without_reapplying(
    bus: Bus, db: psycopg.AsyncConnection[Any], consumers: Factory
) -> None:
    published = await publish(bus, 30)
    first = consumers(Applied(), batch=8)
    await first.start()
    await eventually(reached(db, published[-1][0]), timeout=SETTLE, step=0.1)
    await first.stop()

    more = await publish(bus, 20)
    second_apply = Applied()
    second = consumers(second_apply, batch=8)
    await second.start()
    await eventually(reached(db, more[-1][0]), timeout=SETTLE, step=0.1)
    await second.wait_caught_up(timeout=SETTLE)

    await assert_exactly_once_in_order(db, published + more)
    assert second_apply.calls == more  # only the new events reached the second consumer


async def test_rebuild_replays_every_event_exactly_once(
    bus: Bus, db: psycopg.AsyncConnection[Any], consumers: Factory
) -> None:
    published = await publish(bus, 40)
    apply = Applied()
    consumer = consumers(apply, batch=16)
    await consumer.start()
    await eventually(reached(db, published[-1][0]), timeout=SETTLE, step=0.1)
    assert apply.calls == published

    apply.calls.clear()
    await consumer.rebuild(reset)
    await assert_exactly_once_in_order(db, published)
    assert apply.calls == published  # replayed from the first event, once each

    more = await publish(bus, 5)  # and it keeps following the stream afterwards
    await eventually(reached(db, more[-1][0]), timeout=SETTLE, step=0.1)
    await assert_exactly_once_in_order(db, published + more)


async def test_position_can_be_read_while_the_consumer_runs(
    bus: Bus, db: psycopg.AsyncConnection[Any], consumers: Factory
) -> None:
    """Reading the position (as /ready or a digest does) must not disturb the projection."""
    apply = Applied()
    consumer = consumers(apply, batch=4)
    await consumer.start()
    published: list[tuple[int, str]] = []
    positions: list[int] = []

    async def poll() -> None:
        while True:
            positions.append(await consumer.position())
            await asyncio.sleep(0)

    poller = asyncio.create_task(poll())
    try:
        for _ in range(10):
            published += await publish(bus, 20)
            await asyncio.sleep(0.02)
        await eventually(reached(db, published[-1][0]), timeout=SETTLE, step=0.1)
    finally:
        poller.cancel()
        try:
            await poller
        except asyncio.CancelledError:
            pass
    await assert_exactly_once_in_order(db, published)
    assert positions == sorted(positions)
    assert len(apply.calls) == len(published)  # no batch had to be rolled back and retried


async def test_projection_survives_nats_outages_at_start_and_while_running(
    db: psycopg.AsyncConnection[Any], database_url: str, tmp_path: Path
) -> None:
    server = EmbeddedNats(tmp_path / "own-nats").start()
    settings = load_settings({"GATEHOUSE_NATS_URL": server.url})
    bus = await connect(settings, "test-outage")
    await ensure_stream(bus, settings)
    apply = Applied()
    consumer = ProjectionConsumer(
        bus=bus,
        database_url=database_url,
        schema=SCHEMA,
        name=NAME,
        filter_subject="events.>",
        apply=apply,
        batch=8,
    )
    try:
        published = await publish(bus, 10)
        server.stop()  # the consumer starts while NATS is away
        await consumer.start()
        await asyncio.sleep(6)  # longer than a request timeout: acquiring the lease fails
        assert consumer._task is not None and not consumer._task.done(), (
            "the projection task ended during the outage"
        )
        server = EmbeddedNats(server.root, port=server.port).start()
        await eventually(reached(db, published[-1][0]), timeout=SETTLE, step=0.1)

        server.stop()  # and an outage while it runs
        await asyncio.sleep(2)
        server = EmbeddedNats(server.root, port=server.port).start()
        await eventually(lambda: bus_connected(bus), timeout=SETTLE)
        published += await publish(bus, 10)
        await eventually(reached(db, published[-1][0]), timeout=SETTLE, step=0.1)
        await assert_exactly_once_in_order(db, published)
        assert len(apply.calls) == len(published)
    finally:
        await consumer.stop()
        await bus.close()
        server.stop()


async def bus_connected(bus: Bus) -> bool:
    return bool(bus.nc.is_connected)
