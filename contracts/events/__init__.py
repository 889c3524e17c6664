"""Event payloads, by type name, with their schema version.

`EVENT_TYPES` maps `"<service>.<name>"` to the payload Struct. A consumer that meets a
type missing from this table keeps the envelope and the raw payload.
"""

from typing import Any

import msgspec

from contracts.envelope import Envelope
from contracts.events import builds, gateway, identity, mcp, quota, secrets

EventPayload = msgspec.Struct

EVENT_TYPES: dict[str, type[msgspec.Struct]] = {
    **identity.EVENTS,
    **mcp.EVENTS,
    **secrets.EVENTS,
    **quota.EVENTS,
    **builds.EVENTS,
    **gateway.EVENTS,
}

_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()
}


def event_type_of(payload: msgspec.Struct) -> str:
    for name, cls in EVENT_TYPES.items():
        if type(payload) is cls:
            return name
    raise KeyError(f"{type(payload).__name__} is not a registered event payload")


def decode_payload(envelope: Envelope) -> msgspec.Struct | None:
    """The typed payload, or None for an event type this reader does not know."""
    decoder = _decoders.get(envelope.type)
    if decoder is None:
        return None
    payload: msgspec.Struct = decoder.decode(envelope.data)
    return payload
