"""mcp_proxy's store mapper: msgspec for the per-call facts, readable alongside older rows."""

import uuid
from typing import Any

import pytest
from eventsourcing.persistence import Mapper

from services.mcp_proxy.application.store import ProxyMapper, ProxyStore
from services.mcp_proxy.domain.calls import ProcessRecord, ToolCall, UpstreamProcess
from tests.mcp_facts import call_record

pytestmark = pytest.mark.unit


@pytest.fixture
def store() -> ProxyStore:
    return ProxyStore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


def completed() -> Any:
    failed = call_record(status="error", reached_upstream=False, error="could not start: ünïcode")
    return ToolCall.of(failed).collect_events()[0]


def test_a_tool_call_fact_round_trips_through_msgspec(store: ProxyStore) -> None:
    event = completed()
    stored = store.mapper.to_stored_event(event)
    assert isinstance(store.mapper, ProxyMapper)
    assert stored.state.startswith(b'{"originator_id":')  # msgspec's form, not the transcoder's
    assert store.mapper.to_domain_event(stored) == event


def test_a_tool_call_fact_written_by_the_transcoder_is_still_read(store: ProxyStore) -> None:
    event = completed()
    older = Mapper(transcoder=store.construct_transcoder()).to_stored_event(event)
    assert not older.state.startswith(b'{"originator_id":')
    assert store.mapper.to_domain_event(older) == event


def test_other_events_keep_the_transcoder(store: ProxyStore) -> None:
    token = str(uuid.uuid4())
    process = UpstreamProcess.of(
        ProcessRecord(token=token, server="echo", user_id="u-1", org_id="o-1", pid=7, node="n")
    )
    process.stop("idle")
    for event in process.collect_events():
        stored = store.mapper.to_stored_event(event)
        assert not stored.state.startswith(b'{"originator_id":')
        assert store.mapper.to_domain_event(stored) == event


def test_the_event_made_without_the_aggregate_is_the_aggregates_own(store: ProxyStore) -> None:
    record = call_record(status="error", reached_upstream=False, error="could not start: ünïcode")
    direct, made = ToolCall.completed(record), ToolCall.of(record).collect_events()[0]
    assert type(direct) is type(made)
    same = {"originator_id": made.originator_id, "timestamp": made.timestamp}
    assert type(direct)(**{**vars(direct), **same}) == made  # only its id and time differ
    assert direct.originator_version == 1 and direct.originator_id != made.originator_id
    stored = store.mapper.to_stored_event(direct)
    assert store.mapper.to_domain_event(stored) == direct
    assert stored.topic == store.mapper.to_stored_event(made).topic
