"""The kit's pull consumer (`services/kit/pull.py`) on real JetStream: batches in stream
order, a wait that ends with the first new message, nothing left outstanding after a fetch
(the projection's ordering rests on it), and a clear failure for a consumer that is gone."""

import asyncio
import json
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig

from services.kit.pull import Puller, PullFailed

pytestmark = pytest.mark.integration

STREAM = "PULL_TEST"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    js = client.jetstream()
    await js.add_stream(name=STREAM, subjects=["pull.>"])
    await js.add_consumer(STREAM, ConsumerConfig(durable_name="reader", ack_policy=AckPolicy.ALL))
    yield client
    await client.close()


@pytest.fixture
async def puller(nc: Client) -> AsyncIterator[Puller]:
    p = Puller(nc, STREAM, "reader")
    await p.start()
    yield p
    await p.stop()


async def publish(nc: Client, *bodies: bytes) -> None:
    js = nc.jetstream()
    for body in bodies:
        await js.publish("pull.x", body, headers={"Nats-Msg-Id": body.decode()})


async def test_batches_come_in_stream_order_without_waiting(nc: Client, puller: Puller) -> None:
    await publish(nc, *(b"m%03d" % i for i in range(250)))
    loop = asyncio.get_running_loop()
    seen: list[bytes] = []
    started = loop.time()
    while len(seen) < 250:
        msgs = await puller.fetch(100, timeout=5.0)
        assert len(msgs) == min(100, 250 - len(seen))
        seen += [m.data for m in msgs]
        await msgs[-1].ack()
    assert seen == [b"m%03d" % i for i in range(250)]
    assert loop.time() - started < 2.0  # no batch waited for its timeout (5 s)


async def test_an_empty_consumer_waits_for_the_first_new_message(nc: Client, puller: Puller) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NatsTimeout):
        await puller.fetch(100, timeout=0.5)
    assert 0.4 <= loop.time() - started < 2.0

    async def later() -> None:
        await asyncio.sleep(0.3)
        await publish(nc, b"late")

    task = asyncio.create_task(later())
    started = loop.time()
    msgs = await puller.fetch(100, timeout=5.0)
    await task
    assert [m.data for m in msgs] == [b"late"]
    assert loop.time() - started < 2.0  # woken by the message, not by the 5 s timeout


async def test_nothing_is_left_outstanding_after_a_fetch(nc: Client, puller: Puller) -> None:
    await publish(nc, b"a", b"b")
    msgs = await puller.fetch(100, timeout=1.0)
    assert [m.data for m in msgs] == [b"a", b"b"]
    await msgs[-1].ack()
    await publish(nc, b"c")  # must stay on the server until the next fetch asks for it
    await asyncio.sleep(0.3)
    info = await nc.jetstream().consumer_info(STREAM, "reader")
    assert info.num_waiting == 0 and info.num_ack_pending == 0 and info.num_pending == 1
    assert [m.data for m in await puller.fetch(100, timeout=1.0)] == [b"c"]


async def test_a_deleted_consumer_fails_the_fetch(nc: Client, puller: Puller) -> None:
    await nc.jetstream().delete_consumer(STREAM, "reader")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoRespondersError):  # the projection then pauses and re-creates it
        await puller.fetch(10, timeout=5.0)
    assert loop.time() - started < 2.0  # told at once, not after the timeout


async def test_a_refused_request_fails_the_fetch_with_the_servers_reason(nc: Client) -> None:
    # nats-py's ConsumerConfig has no max_batch: create it through the JetStream API itself
    config = {"durable_name": "small", "ack_policy": "all", "max_batch": 5}
    created = await nc.request(
        f"$JS.API.CONSUMER.CREATE.{STREAM}.small",
        json.dumps({"stream_name": STREAM, "config": config}).encode(),
        timeout=5.0,
    )
    assert b'"error"' not in created.data
    await publish(nc, b"x")
    small = Puller(nc, STREAM, "small")
    await small.start()
    try:
        with pytest.raises(PullFailed, match=r"409.*MaxRequestBatch"):
            await small.fetch(10, timeout=5.0)
        assert [m.data for m in await small.fetch(5, timeout=1.0)] == [b"x"]  # within the limit
    finally:
        await small.stop()
