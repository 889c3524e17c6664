"""The client's reply path (services/kit/replies.py) on real NATS: every request gets its own
reply or a 503 sentence, in time, and leaves nothing behind."""

import asyncio
import gc
import random
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.kit.bus import Bus, connect
from services.kit.config import load_settings
from services.kit.embedded import EmbeddedNats, free_port
from services.kit.replies import replies
from services.kit.rpc import CommandClient, CommandFailed, CommandServer
from tests.helpers import eventually
from tests.integration.calc import Add, Sum, connected

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    async with connected(nats_url, "test-replies") as bus:
        yield bus


@pytest.fixture
async def release() -> AsyncIterator[asyncio.Event]:
    """Holds the `calc.slow` handler until set (set at teardown so the server can stop)."""
    event = asyncio.Event()
    yield event
    event.set()


@pytest.fixture
async def calculator(bus: Bus, release: asyncio.Event) -> AsyncIterator[None]:
    """`add` answers after a random short pause (replies come back out of order); `slow` waits."""
    server = CommandServer(bus, "calc")

    async def add(c: Add) -> Sum:
        await asyncio.sleep(random.random() / 100)
        return Sum(c.a + c.b)

    async def slow(c: Add) -> Sum:
        await release.wait()
        return Sum(c.a + c.b)

    server.route("add", Add, add)
    server.route("slow", Add, slow)
    await server.start()
    yield
    release.set()
    await server.stop()


async def test_reply_is_delivered_and_forgotten(bus: Bus, calculator: None) -> None:
    client = CommandClient(bus)
    assert await client.call("calc", "add", Add(a=2, b=3), Sum) == Sum(5)
    assert await client.call("calc", "add", Add(a=4, b=3), Sum) == Sum(7)
    assert len(replies(bus.nc)) == 0


async def test_clients_on_one_connection_share_one_reply_subscription(bus: Bus, calculator: None) -> None:
    await CommandClient(bus).call("calc", "add", Add(a=1, b=1), Sum)
    mux = replies(bus.nc)
    subscriptions = len(bus.nc._subs)
    await asyncio.gather(*(CommandClient(bus).call("calc", "add", Add(a=n, b=1), Sum) for n in range(5)))
    assert replies(bus.nc) is mux
    assert len(bus.nc._subs) == subscriptions


async def test_a_new_connection_gets_its_own_replies_and_a_closed_one_is_released(
    bus: Bus, calculator: None, nats_url: str
) -> None:
    other = await connect(load_settings({"GATEHOUSE_NATS_URL": nats_url}), "test-replies-2")
    assert await CommandClient(other).call("calc", "add", Add(a=1, b=1), Sum) == Sum(2)
    assert replies(other.nc) is not replies(bus.nc)
    closed = weakref.ref(other.nc)
    await other.close()
    del other
    gc.collect()
    assert closed() is None  # the reply registry does not keep old connections alive


async def test_timeout_is_a_503_not_answering(bus: Bus, calculator: None) -> None:
    started = time.monotonic()
    with pytest.raises(CommandFailed) as failed:
        await CommandClient(bus).call("calc", "slow", Add(a=1, b=1), Sum, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert failed.value.problem.status == 503
    assert failed.value.problem.detail == "The calc service is not answering; try again shortly."
    assert len(replies(bus.nc)) == 0


async def test_late_reply_after_a_timeout_is_ignored(
    bus: Bus, calculator: None, release: asyncio.Event
) -> None:
    client = CommandClient(bus)
    with pytest.raises(CommandFailed):
        await client.call("calc", "slow", Add(a=1, b=1), Sum, timeout=0.2)
    release.set()  # the handler now answers a caller that gave up
    await asyncio.sleep(0.1)
    assert await client.call("calc", "add", Add(a=1, b=2), Sum) == Sum(3)
    assert len(replies(bus.nc)) == 0


async def test_no_responders_is_a_503_well_before_the_timeout(bus: Bus) -> None:
    started = time.monotonic()
    with pytest.raises(CommandFailed) as failed:
        await CommandClient(bus).call("billing", "charge", Add(a=1, b=2), Sum, timeout=30)
    assert time.monotonic() - started < 2
    assert failed.value.problem.status == 503
    assert failed.value.problem.detail == "The billing service is not answering; try again shortly."
    assert len(replies(bus.nc)) == 0


async def test_concurrent_requests_each_get_their_own_reply(bus: Bus, calculator: None) -> None:
    client = CommandClient(bus)
    results = await asyncio.gather(*(client.call("calc", "add", Add(a=n, b=1000), Sum) for n in range(300)))
    assert [r.total for r in results] == [n + 1000 for n in range(300)]
    assert len(replies(bus.nc)) == 0


async def test_a_cancelled_caller_leaves_no_entry(bus: Bus, calculator: None) -> None:
    client = CommandClient(bus)
    waiting = asyncio.create_task(client.call("calc", "slow", Add(a=1, b=1), Sum, timeout=30))

    async def in_flight() -> bool:
        return len(replies(bus.nc)) == 1

    await eventually(in_flight, timeout=5, step=0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(replies(bus.nc)) == 0
    assert await client.call("calc", "add", Add(a=1, b=2), Sum) == Sum(3)


async def test_replies_keep_arriving_after_nats_restarts(tmp_path: Path) -> None:
    nats_server = EmbeddedNats(tmp_path / "nats", port=free_port()).start()
    settings = load_settings({"GATEHOUSE_NATS_URL": nats_server.url})
    server_bus = await connect(settings, "calc")
    client_bus = await connect(settings, "client")
    server = CommandServer(server_bus, "calc")

    async def add(c: Add) -> Sum:
        return Sum(c.a + c.b)

    server.route("add", Add, add)
    client = CommandClient(client_bus)
    try:
        await server.start()
        assert await client.call("calc", "add", Add(a=1, b=1), Sum) == Sum(2)
        nats_server.stop()
        with pytest.raises(CommandFailed) as failed:
            await client.call("calc", "add", Add(a=1, b=1), Sum, timeout=1)
        assert failed.value.problem.status == 503
        assert failed.value.problem.detail == ("The message bus (NATS) is not reachable; try again shortly.")
        nats_server.start()  # same port: both connections come back and resubscribe

        async def answered() -> Sum | None:
            try:
                return await client.call("calc", "add", Add(a=2, b=2), Sum, timeout=1)
            except CommandFailed:
                return None

        assert await eventually(answered, timeout=30, step=0.2) == Sum(4)
        assert len(replies(client_bus.nc)) == 0
    finally:
        await server.stop()
        await client_bus.close()
        await server_bus.close()
        nats_server.stop()
