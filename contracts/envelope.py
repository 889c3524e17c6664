"""The envelope every event travels in.

The payload is kept as raw JSON (`data`) so a consumer can read the envelope of an
event type it does not know, and skip or record it instead of crashing.
"""

from datetime import datetime
from typing import Any

import msgspec

ENVELOPE_VERSION = 1


class Actor(msgspec.Struct, omit_defaults=True):
    """Who caused something: a user (through one of their keys), a service, or nobody."""

    kind: str  # "user" | "service" | "anonymous" | "operator"
    id: str
    key_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None


SYSTEM = Actor(kind="service", id="gatehouse")


class TraceContext(msgspec.Struct, omit_defaults=True):
    """W3C trace context, as carried in `traceparent` / `tracestate` headers."""

    traceparent: str | None = None
    tracestate: str | None = None


class Envelope(msgspec.Struct, omit_defaults=True):
    event_id: str
    type: str  # "<service>.<event_name>"
    schema_version: int
    occurred_at: datetime
    org_id: str | None
    actor: Actor
    correlation_id: str
    trace: TraceContext = msgspec.field(default_factory=TraceContext)
    data: msgspec.Raw = msgspec.Raw(b"{}")
    envelope_version: int = ENVELOPE_VERSION

    @property
    def service(self) -> str:
        return self.type.split(".", 1)[0]


_envelope_decoder = msgspec.json.Decoder(Envelope)
_encoder = msgspec.json.Encoder()


def encode_envelope(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode_envelope(raw: bytes) -> Envelope:
    """Raises msgspec.DecodeError / ValidationError for bytes that are no envelope."""
    return _envelope_decoder.decode(raw)


def payload_bytes(payload: Any) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(payload))
