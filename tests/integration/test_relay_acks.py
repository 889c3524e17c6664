"""The relay's lean JetStream publish (`Replies.request_all`, `outbox.stored`) on real NATS:
every message gets its own ack, in order; a duplicate counts as stored; an error, a missing
stream or no answer does not."""

import asyncio
import json
import uuid

import pytest
from nats.js.api import Header

from contracts.subjects import STREAM, event_subject
from services.kit.bus import Bus
from services.kit.outbox import stored
from services.kit.replies import replies

pytestmark = pytest.mark.integration


def _headers(msg_id: str, stream: str = STREAM) -> dict[str, str]:
    return {"Nats-Msg-Id": msg_id, Header.EXPECTED_STREAM.value: stream}


async def test_every_message_is_acked_in_order_and_a_duplicate_counts_as_stored(stream_bus: Bus) -> None:
    subject = event_subject("test.relay_acked")
    ids = [str(uuid.uuid4()) for _ in range(50)]
    acks = await replies(stream_bus.nc).request_all(
        [(subject, f'{{"n": {i}}}'.encode(), _headers(msg_id)) for i, msg_id in enumerate(ids)], 5.0
    )
    assert all(stored(ack) for ack in acks)
    seqs = [json.loads(ack.data)["seq"] for ack in acks if ack]
    assert seqs == sorted(seqs) and len(set(seqs)) == 50  # one stream message each, in order

    again = await replies(stream_bus.nc).request_all([(subject, b'{"n": 0}', _headers(ids[0]))], 5.0)
    assert again[0] is not None and stored(again[0]) and json.loads(again[0].data)["duplicate"]
    info = await stream_bus.js.stream_info(STREAM)
    assert info.state.messages == 50  # the duplicate was not stored twice


async def test_a_wrong_stream_or_no_stream_is_not_stored(stream_bus: Bus) -> None:
    wrong = await replies(stream_bus.nc).request_all(
        [(event_subject("test.relay_wrong"), b"{}", _headers(str(uuid.uuid4()), "NOT_OURS"))], 5.0
    )
    assert wrong[0] is not None and b"error" in wrong[0].data and not stored(wrong[0])

    nowhere = await replies(stream_bus.nc).request_all(
        [("no.stream.listens.here", b"{}", _headers(str(uuid.uuid4())))], 5.0
    )
    assert not stored(nowhere[0])  # a no-responders status, at once


async def test_no_answer_in_time_is_none_and_leaves_no_entry(stream_bus: Bus) -> None:
    sub = await stream_bus.nc.subscribe("test.relay.silent")  # takes the message, never answers
    lean = replies(stream_bus.nc)
    loop = asyncio.get_running_loop()
    started = loop.time()
    acks = await lean.request_all([("test.relay.silent", b"{}", None)] * 3, 0.2)
    assert acks == [None, None, None] and not any(stored(a) for a in acks)
    assert 0.2 <= loop.time() - started < 2.0
    assert len(lean) == 0
    await sub.unsubscribe()
