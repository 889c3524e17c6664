"""mcp_proxy's store mapper: msgspec for the per-call facts, readable alongside older rows."""

import uuid
from datetime import UTC, datetime

import pytest
from eventsourcing.persistence import Mapper

from services.mcp_proxy.application.store import ProxyMapper, ProxyStore
from services.mcp_proxy.domain.calls import CallRecord, ProcessRecord, ToolCall, UpstreamProcess

pytestmark = pytest.mark.unit


@pytest.fixture
def store() -> ProxyStore:
    return ProxyStore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


def completed() -> object:
    record = CallRecord(
        request_id="r-1",
        user_id="u-1",
        org_id="o-1",
        server="echo",
        tool_name="echo",
        status="error",
        duration_ms=2.5,
        arguments_sha256="0" * 64,
        arguments_bytes=2,
        result_bytes=0,
        reached_upstream=False,
        started_at=datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
        error="The server 'echo' could not be started: ünïcode.",
        meta={"actor": {"kind": "user", "id": "u-1"}, "correlation_id": "c"},
    )
    return ToolCall.of(record).collect_events()[0]


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
