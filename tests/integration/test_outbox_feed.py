"""The outbox relay fed by a writer of its own process: what it publishes without a store read.

Real NATS and PostgreSQL; mcp_proxy's store and fact writer (the per-call facts), one relay.
"""

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.eventstore import open_store
from services.kit.outbox import NOTIFICATION_HEADER, Fed, OutboxRelay
from services.mcp_proxy.adapters.fact_writer import FactWriter
from services.mcp_proxy.adapters.outbox import translate
from services.mcp_proxy.application.store import ProxyStore
from services.mcp_proxy.domain.calls import ToolCall
from tests.helpers import eventually, stream_messages
from tests.mcp_facts import call_record

pytestmark = pytest.mark.integration
SCHEMA = "mcp_proxy"


class CountingRelay(OutboxRelay):
    """Counts its store reads (the path a fed row must not need)."""

    reads = 0

    def _select(self, position: int) -> Any:
        self.reads += 1
        return super()._select(position)


@pytest.fixture
def bus(stream_bus: Bus) -> Bus:
    return stream_bus


def call(n: int) -> ToolCall:
    return ToolCall.of(call_record(f"req-{n}", started_at=datetime.now(UTC)))


async def published_requests(bus: Bus, n: int) -> list[tuple[int, str]] | None:
    found = await stream_messages(bus, "events.mcp_proxy.>")
    if len(found) < n:
        return None
    out = []
    for m in found:
        data: dict[str, Any] = msgspec.json.decode(m.envelope.data)
        out.append((int(m.headers[NOTIFICATION_HEADER]), str(data["request_id"])))
    return out


async def test_fed_rows_are_published_in_order_without_a_store_read_and_a_gap_reads_the_store(
    bus: Bus, settings: Settings
) -> None:
    store = open_store(settings, SCHEMA, lambda env: ProxyStore(env=env))
    relay = CountingRelay(SCHEMA, store, bus, translate, poll_s=30.0)  # no polling: only wakes
    fed: list[list[Fed]] = []

    def on_rows(rows: list[Fed]) -> None:
        fed.append(rows)
        relay.feed(rows)
        relay.wake()

    writer = FactWriter(store, settings.require_database(), on_rows=on_rows)
    await relay.start()
    try:

        async def caught_up() -> bool:  # following, and its first store read (empty) done
            return relay._following and relay.reads >= 1

        await eventually(caught_up, timeout=15)
        await asyncio.sleep(0.2)
        reads_at_start = relay.reads

        for batch in ([call(i) for i in range(3)], [call(i) for i in range(3, 8)]):
            await writer.write([e for agg in batch for e in agg.collect_events()])
        first = await eventually(lambda: published_requests(bus, 8), timeout=10)
        assert [r for _, r in first] == [f"req-{i}" for i in range(8)]
        ids = [n for n, _ in first]
        assert ids == sorted(ids) and len(set(ids)) == 8
        assert [row[0].id for rows in fed for row in rows] == ids  # what the writer fed, in order
        assert relay.reads == reads_at_start, "the relay read the store for rows it was fed"

        # A row this relay was not fed (another instance's writer) lands between fed ones.
        other = FactWriter(store, settings.require_database(), on_rows=lambda _: None)
        await other.write(call(8).collect_events())
        await writer.write(call(9).collect_events())
        second = await eventually(lambda: published_requests(bus, 10), timeout=10)
        assert [r for _, r in second] == [f"req-{i}" for i in range(10)]
        assert relay.reads > reads_at_start, "a gap must send the relay to the store"
        assert relay.published == 10  # each exactly once
        await other.stop()
    finally:
        await relay.stop()
        await writer.stop()


async def test_a_relay_that_does_not_follow_keeps_nothing_it_is_fed(bus: Bus, settings: Settings) -> None:
    store = open_store(settings, SCHEMA, lambda env: ProxyStore(env=env))
    relay = OutboxRelay(SCHEMA, store, bus, translate)
    writer = FactWriter(store, settings.require_database(), on_rows=relay.feed)
    try:
        await writer.write(call(0).collect_events())  # the relay was never started
        assert len(relay._fed) == 0
    finally:
        await writer.stop()
    assert uuid.UUID(str(store.recorder.select_notifications(0, 1)[0].originator_id))  # it was saved
