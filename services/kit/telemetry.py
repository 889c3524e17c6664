"""OpenTelemetry tracing; W3C trace context travels in NATS headers and in event envelopes."""

import functools
import random
from collections.abc import Mapping
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from contracts.envelope import TraceContext

_propagator = TraceContextTextMapPropagator()


_recording = False  # spans are made only when something exports them


def configure_tracing(service: str, export: str = "none") -> None:
    global _recording
    provider = TracerProvider(resource=Resource.create({"service.name": f"gatehouse-{service}"}))
    if export == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    _recording = export != "none"
    trace.set_tracer_provider(provider)
    propagate.set_global_textmap(_propagator)


def recording() -> bool:
    """Whether spans are exported. When not, a command makes none (an SDK span costs ~40 us of
    CPU, a tenth of a quota reservation) and the caller's trace context is passed on as is."""
    return _recording


@functools.lru_cache(maxsize=64)
def tracer(name: str) -> trace.Tracer:
    """Cached: the SDK's get_tracer costs ~30 us, paid on every command otherwise. A tracer taken
    before `configure_tracing` is a proxy that follows the provider set later."""
    return trace.get_tracer(name)


def current_trace() -> TraceContext:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return TraceContext(traceparent=carrier.get("traceparent"), tracestate=carrier.get("tracestate"))


def inject(headers: dict[str, str], ctx: TraceContext | None = None) -> dict[str, str]:
    """Adds traceparent/tracestate of `ctx` (or the current span) to NATS headers."""
    ctx = ctx or current_trace()
    if ctx.traceparent:
        headers["traceparent"] = ctx.traceparent
    if ctx.tracestate:
        headers["tracestate"] = ctx.tracestate
    return headers


def extract(headers: Mapping[str, str] | None) -> Any:
    """An OpenTelemetry context continuing the trace named in the headers."""
    return _propagator.extract(dict(headers or {}))


def incoming(headers: Mapping[str, str] | None) -> Any:
    """The context a command runs in: the caller's trace; when nothing records spans and the
    caller sent none, a new trace id (as a root span would have had), so its events and audit
    entries still share one."""
    ctx = extract(headers)
    if _recording or trace.get_current_span(ctx).get_span_context().is_valid:
        return ctx
    root = trace.SpanContext(random.getrandbits(128) or 1, random.getrandbits(64) or 1, is_remote=False)
    return trace.set_span_in_context(trace.NonRecordingSpan(root), ctx)


def attach(ctx: Any) -> object:
    return context.attach(ctx)


def detach(token: object) -> None:
    context.detach(token)  # type: ignore[arg-type]


def trace_id_of(ctx: TraceContext) -> str | None:
    if ctx.traceparent and len(ctx.traceparent) >= 35:
        return ctx.traceparent[3:35]
    return None
