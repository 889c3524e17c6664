"""The shared contract: envelopes stay readable across versions, payloads round-trip."""

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from contracts.envelope import (
    Actor,
    Envelope,
    TraceContext,
    decode_envelope,
    encode_envelope,
    payload_bytes,
)
from contracts.events import EVENT_TYPES, decode_payload, event_type_of
from contracts.events import identity as ev

pytestmark = pytest.mark.unit

AT = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def envelope_of(payload: msgspec.Struct, **overrides: object) -> Envelope:
    fields: dict[str, object] = {
        "event_id": "0b1e4a52-0000-4000-8000-000000000001",
        "type": event_type_of(payload),
        "schema_version": 1,
        "occurred_at": AT,
        "org_id": "org-1",
        "actor": Actor(kind="user", id="u-1", key_id="k-1"),
        "correlation_id": "corr-1",
        "trace": TraceContext(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
        "data": payload_bytes(payload),
    }
    fields.update(overrides)
    return Envelope(**fields)  # type: ignore[arg-type]


IDENTITY_SAMPLES: list[msgspec.Struct] = [
    ev.OrgCreated(org_id="o-1", name="acme", personal=True),
    ev.UserRegistered(user_id="u-1", email="a@example.com", org_id="o-1", tier="pro", is_admin=True),
    ev.TierChanged(user_id="u-1", tier="team", previous_tier="pro"),
    ev.ApiKeyIssued(
        key_id="k-1",
        user_id="u-1",
        name="laptop",
        prefix="mcp_abcdefgh",
        key_hash="f" * 64,
        created_at=AT,
        expires_at=AT + timedelta(days=30),
    ),
    ev.ApiKeyIssued(
        key_id="k-2",
        user_id="u-1",
        name="ci",
        prefix="mcp_12345678",
        key_hash="0" * 64,
        created_at=AT,
    ),
    ev.ApiKeyRevoked(key_id="k-1", user_id="u-1", revoked_at=AT),
    ev.ApiKeyUsed(key_id="k-1", user_id="u-1", used_at=AT),
]


def test_every_identity_event_has_a_sample() -> None:
    covered = {event_type_of(p) for p in IDENTITY_SAMPLES}
    assert covered == set(ev.EVENTS)


@pytest.mark.parametrize("payload", IDENTITY_SAMPLES, ids=lambda p: type(p).__name__)
def test_identity_event_round_trips_through_the_envelope(payload: msgspec.Struct) -> None:
    envelope = envelope_of(payload)
    decoded = decode_envelope(encode_envelope(envelope))
    assert decoded.type == event_type_of(payload)
    assert decoded.service == "identity"
    assert decoded.event_id == envelope.event_id
    assert decoded.occurred_at == AT
    assert decoded.actor == envelope.actor
    assert decoded.trace == envelope.trace
    back = decode_payload(decoded)
    assert type(back) is type(payload)
    assert back == payload


def test_event_types_table_maps_names_to_their_structs() -> None:
    for name, cls in EVENT_TYPES.items():
        service, _, event_name = name.partition(".")
        assert service and event_name, name
        assert issubclass(cls, msgspec.Struct)


def test_envelope_with_unknown_fields_decodes() -> None:
    """A newer writer may add envelope fields; an older reader must keep working."""
    payload = ev.OrgCreated(org_id="o-1", name="acme")
    raw = msgspec.json.decode(encode_envelope(envelope_of(payload)))
    raw["priority"] = "high"
    raw["routing"] = {"region": "eu", "hops": [1, 2]}
    raw["actor"]["department"] = "finance"
    raw["envelope_version"] = 2
    decoded = decode_envelope(msgspec.json.encode(raw))
    assert decoded.type == "identity.org_created"
    assert decoded.envelope_version == 2
    assert decoded.actor.id == "u-1"
    assert decode_payload(decoded) == payload


def test_payload_with_unknown_fields_decodes() -> None:
    data = msgspec.json.encode({"org_id": "o-1", "name": "acme", "personal": False, "region": "eu-west-1"})
    envelope = envelope_of(ev.OrgCreated(org_id="x", name="x"), data=msgspec.Raw(data))
    payload = decode_payload(decode_envelope(encode_envelope(envelope)))
    assert payload == ev.OrgCreated(org_id="o-1", name="acme", personal=False)


def test_unknown_event_type_gives_no_payload_but_keeps_the_envelope() -> None:
    raw_data = b'{"build_id":"b-1","prompts":["hi"]}'
    envelope = envelope_of(
        ev.OrgCreated(org_id="x", name="x"),
        type="future_service.something_happened",
        data=msgspec.Raw(raw_data),
    )
    decoded = decode_envelope(encode_envelope(envelope))
    assert decode_payload(decoded) is None
    assert decoded.service == "future_service"
    assert msgspec.json.decode(decoded.data) == {"build_id": "b-1", "prompts": ["hi"]}


def test_bytes_that_are_no_envelope_raise_a_msgspec_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_envelope(b"not json")
    with pytest.raises(msgspec.ValidationError):
        decode_envelope(b'{"event_id": "e-1"}')


def test_event_type_of_an_unregistered_struct_raises() -> None:
    class Stray(msgspec.Struct):
        x: int

    with pytest.raises(KeyError):
        event_type_of(Stray(x=1))
