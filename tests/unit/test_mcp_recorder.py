"""The recorder: batches of call and process records become their aggregates' events, once."""

import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from services.mcp_proxy.application.recorder import Recorder
from services.mcp_proxy.domain.calls import ProcessRecord
from tests.mcp_facts import call_record

pytestmark = pytest.mark.unit


class Store:
    """Stands in for the fact writer: keeps what it was given, or fails when told to."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.fail = False

    async def write(self, events: Sequence[Any]) -> None:
        if self.fail:
            raise ConnectionError("PostgreSQL is away")
        self.batches.append(list(events))


def process(token: str, reason: str | None = None) -> ProcessRecord:
    return ProcessRecord(
        token=token, server="echo", user_id="u-1", org_id="o-1", pid=42, node="n", reason=reason
    )


def names(events: list[Any]) -> list[tuple[str, int]]:
    return [(type(e).__qualname__, e.originator_version) for e in events]


async def test_a_batch_becomes_the_events_of_its_aggregates() -> None:
    store = Store()
    recorder = Recorder(store.write, batch=100, interval_s=0.0)
    token = str(uuid.uuid4())
    recorder.call(call_record("r-1"))
    recorder.process(process(token))
    recorder.process(process(token, "idle"))  # started and stopped within one batch
    await recorder._flush()
    (events,) = store.batches
    assert names(events) == [
        ("ToolCall.Completed", 1),
        ("UpstreamProcess.Started", 1),
        ("UpstreamProcess.Stopped", 2),
    ]
    assert events[0].request_id == "r-1" and events[0].meta["org_id"] == "o-1"
    assert str(events[1].originator_id) == token == str(events[2].originator_id)
    assert recorder.saved == 3 and recorder.pending == 0


async def test_a_stop_in_a_later_batch_continues_the_process_and_a_failed_write_keeps_the_batch() -> None:
    store = Store()
    recorder = Recorder(store.write, batch=100, interval_s=0.0)
    token = str(uuid.uuid4())
    recorder.process(process(token))
    await recorder._flush()
    recorder.process(process(token, "crashed"))
    recorder.call(call_record("r-2"))
    store.fail = True
    with pytest.raises(ConnectionError):
        await recorder._flush()
    assert recorder.pending == 2 and recorder.saved == 1  # kept, in order, for the next attempt
    store.fail = False
    await recorder._flush()
    assert names(store.batches[1]) == [("ToolCall.Completed", 1), ("UpstreamProcess.Stopped", 2)]
    assert store.batches[1][1].reason == "crashed"
    recorder.process(process(token, "again"))  # a second stop of a stopped process: nothing
    await recorder._flush()
    assert len(store.batches) == 2 and recorder.saved == 4
