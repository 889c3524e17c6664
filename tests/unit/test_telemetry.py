"""A command's trace context: passed on as received, or a new trace id when there was none."""

import pytest

from contracts.envelope import TraceContext
from services.kit import telemetry

pytestmark = pytest.mark.unit

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _traceparent_in(ctx: object) -> str | None:
    token = telemetry.attach(ctx)
    try:
        return telemetry.current_trace().traceparent
    finally:
        telemetry.detach(token)


def test_without_an_exporter_the_callers_trace_is_passed_on_unchanged() -> None:
    telemetry.configure_tracing("test", "none")
    assert not telemetry.recording()
    assert _traceparent_in(telemetry.incoming({"traceparent": TRACEPARENT})) == TRACEPARENT


def test_without_an_exporter_a_command_with_no_trace_starts_one() -> None:
    telemetry.configure_tracing("test", "none")
    first = _traceparent_in(telemetry.incoming(None))
    second = _traceparent_in(telemetry.incoming({}))
    assert first and second
    trace_ids = {telemetry.trace_id_of(TraceContext(traceparent=t)) for t in (first, second)}
    assert len(trace_ids) == 2 and None not in trace_ids  # a new trace each time


def test_with_an_exporter_spans_are_recorded() -> None:
    telemetry.configure_tracing("test", "console")
    try:
        assert telemetry.recording()
    finally:
        telemetry.configure_tracing("test", "none")
