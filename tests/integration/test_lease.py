"""The KV lease that keeps one outbox relay / one projection consumer active at a time."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.kit.bus import Bus, connect
from services.kit.config import load_settings
from services.kit.lease import BUCKET, Lease

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    bus = await connect(load_settings({"GATEHOUSE_NATS_URL": nats_url}), "test-lease")
    yield bus
    await bus.close()


async def holder(bus: Bus, key: str) -> str:
    kv = await bus.js.key_value(BUCKET)
    entry = await kv.get(key)
    assert entry.value is not None
    return entry.value.decode()


async def test_first_use_from_leases_with_different_ttls_succeeds(bus: Bus) -> None:
    """A relay (6 s) and a projection (10 s) starting together on a fresh server both get going."""
    leases = [Lease(bus, f"key-{i}", holder=f"h{i}", ttl=6.0 + (i % 2) * 4) for i in range(6)]
    results = await asyncio.gather(*(lease.acquire() for lease in leases), return_exceptions=True)
    assert results == [None] * 6
    for i in range(6):
        assert await holder(bus, f"key-{i}") == f"h{i}"


async def test_one_holder_at_a_time_and_release_hands_over(bus: Bus) -> None:
    first = Lease(bus, "relay.identity", holder="first")
    second = Lease(bus, "relay.identity", holder="second")
    await first.acquire()
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(1.0)
    assert not waiting.done()
    assert await first.renew()
    await first.release()
    await asyncio.wait_for(waiting, timeout=10)
    assert await holder(bus, "relay.identity") == "second"
    assert not await first.renew()  # the old holder cannot take it back by renewing
    assert await second.renew()


async def test_a_waiter_that_gives_up_does_not_free_the_holders_lease(bus: Bus) -> None:
    """Stopping a standby instance (relay or projection) must leave the active one in charge."""
    active = Lease(bus, "projection.audit", holder="active")
    standby = Lease(bus, "projection.audit", holder="standby")
    await active.acquire()
    waiting = asyncio.create_task(standby.acquire())
    await asyncio.sleep(0.5)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await standby.release()  # what OutboxRelay.stop / ProjectionConsumer.stop do

    intruder = Lease(bus, "projection.audit", holder="intruder")
    attempt = asyncio.create_task(intruder.acquire())
    await asyncio.sleep(1.0)
    assert not attempt.done(), "a third instance took a lease that is still held"
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    assert await holder(bus, "projection.audit") == "active"
    assert await active.renew()


async def test_releasing_twice_does_not_free_a_new_holders_lease(bus: Bus) -> None:
    first = Lease(bus, "relay.identity", holder="first")
    second = Lease(bus, "relay.identity", holder="second")
    await first.acquire()
    await first.release()
    await asyncio.wait_for(second.acquire(), timeout=10)
    await first.release()
    assert await holder(bus, "relay.identity") == "second"
    assert await second.renew()
