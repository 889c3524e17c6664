"""One entry of the trail, made from one message of the stream.

Every message makes an entry, even one that cannot be read (`event.undecodable`): the
trail shows that something arrived instead of silently skipping it. Entries are made only
from what the stream holds (never the time of ingestion) so a rebuild makes the same ones.
"""

import functools
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

from contracts.envelope import Actor, Envelope
from services.audit.domain.catalogue import Meaning, meaning_of, outcome_of, resource_id, subject_user
from services.audit.domain.metadata import MAX_ID, clean_id, clean_text, plain_id, scrub, scrub_plain
from services.kit.redaction import leaves_unchanged, secrets_version
from services.kit.telemetry import trace_id_of

PLATFORM = "_platform"  # the chain of entries that name no org
UNDECODABLE = "event.undecodable"
UNKNOWN_ACTOR = Actor(kind="service", id="unknown")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAMESPACE = uuid.UUID("a3c1f6f2-52b8-4f0e-9d67-0d7e2b1c4a10")


class Entry(msgspec.Struct, kw_only=True, frozen=True):
    """`seq`, `prev_hash` and `hash` are set when the entry is sealed into its org's chain."""

    id: str
    org_id: str
    stream_seq: int
    at: datetime
    actor: Actor
    subject_user_id: str | None
    action: str
    resource_type: str
    resource_id: str
    outcome: str
    metadata: dict[str, Any]
    correlation_id: str | None
    trace_id: str | None
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""


def entry_for(
    stream_seq: int,
    subject: str,
    envelope: Envelope | None,
    error: str | None,
    previous_at: datetime | None = None,
    raw: bytes | None = None,
) -> Entry:
    """The entry for one delivered message; `previous_at` dates one with no envelope.

    `raw` (the message as received, optional) lets a message with nothing to redact skip
    the string-by-string redaction: the entry is the same either way.
    """
    if envelope is None:
        return _undecodable(stream_seq, subject, error or "not an envelope", None, previous_at)
    data = None if error else _payload(envelope.data)
    if data is None:
        return _undecodable(stream_seq, subject, error or "payload is not JSON", envelope, None)
    if raw is not None and type(data) is dict and leaves_unchanged(raw):
        return _plain_entry(stream_seq, envelope, data)
    meaning = meaning_of(envelope.type)
    return Entry(
        id=_event_id(envelope, stream_seq),
        org_id=chain_of(envelope.org_id),
        stream_seq=stream_seq,
        at=instant(envelope.occurred_at),
        actor=_actor(envelope.actor),
        subject_user_id=clean_id(subject_user(data)),
        action=_id(meaning.action),
        resource_type=_id(meaning.resource_type),
        resource_id=_id(resource_id(meaning, data)),
        outcome=_id(outcome_of(data)),
        metadata=scrub(data),
        correlation_id=clean_id(envelope.correlation_id),
        trace_id=clean_id(trace_id_of(envelope.trace)),
    )


def _plain_entry(stream_seq: int, envelope: Envelope, data: dict[str, Any]) -> Entry:
    """`entry_for` of a message whose strings `redact` leaves unchanged (`leaves_unchanged` of
    its JSON): strings from the message only need their length bounded. Strings that are not
    in the message (the catalogue's, and their cleaned forms) still go through `clean_id`."""
    secrets = secrets_version()
    action, resource_type, meaning = _meaning(envelope.type, secrets)
    a = envelope.actor
    ua = a.user_agent
    outcome = data.get("outcome")  # as `outcome_of`, which defaults to success
    outcome = _plain_text_id(outcome) if type(outcome) is str and outcome else _constant("success", secrets)
    return Entry(
        id=(envelope.event_id if len(envelope.event_id) <= MAX_ID else _id(envelope.event_id))
        if envelope.event_id
        else _stream_id(stream_seq),
        org_id=_plain_org(envelope.org_id),
        stream_seq=stream_seq,
        at=instant(envelope.occurred_at),
        actor=Actor(
            kind=_plain_text_id(a.kind),
            id=_plain_text_id(a.id),
            key_id=plain_id(a.key_id),
            ip=plain_id(a.ip),
            user_agent=ua if ua is None or len(ua) <= 512 else clean_text(ua, 512),
        ),
        subject_user_id=plain_id(subject_user(data)),
        action=action,
        resource_type=resource_type,
        resource_id=_plain_text_id(resource_id(meaning, data)),
        outcome=outcome,
        metadata=scrub_plain(data),
        correlation_id=plain_id(envelope.correlation_id),
        trace_id=plain_id(trace_id_of(envelope.trace)),
    )


@functools.lru_cache(maxsize=1024)
def _meaning(event_type: str, secrets: int) -> tuple[str, str, Meaning]:
    """(action, resource type, meaning) as `entry_for` cleans them, for the secrets registered
    so far (`secrets` is `secrets_version()`: a new secret makes new cache entries)."""
    meaning = meaning_of(event_type)
    return _id(meaning.action), _id(meaning.resource_type), meaning


@functools.lru_cache(maxsize=64)
def _constant(text: str, secrets: int) -> str:
    return _id(text)


def _plain_org(org_id: str | None) -> str:
    return (org_id if len(org_id) <= MAX_ID else _id(org_id)) if org_id else PLATFORM


def _plain_text_id(text: str) -> str:
    return text if len(text) <= MAX_ID else _id(text)


def chain_of(org_id: str | None) -> str:
    return _id(org_id) if org_id else PLATFORM


def instant(at: datetime) -> datetime:
    """Aware and in UTC: a naive timestamp on the wire is taken as UTC."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _payload(raw: msgspec.Raw) -> dict[str, Any] | None:
    try:
        data = msgspec.json.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return data if isinstance(data, dict) else {"payload": data}


def _undecodable(
    stream_seq: int,
    subject: str,
    error: str,
    envelope: Envelope | None,
    previous_at: datetime | None,
) -> Entry:
    metadata: dict[str, Any] = {"subject": subject, "stream_seq": stream_seq, "error": error[:500]}
    if envelope is None:
        return Entry(
            id=_stream_id(stream_seq),
            org_id=PLATFORM,
            stream_seq=stream_seq,
            at=previous_at or EPOCH,
            actor=UNKNOWN_ACTOR,
            subject_user_id=None,
            action=UNDECODABLE,
            resource_type="event",
            resource_id=str(stream_seq),
            outcome="error",
            metadata=scrub(metadata),
            correlation_id=None,
            trace_id=None,
        )
    metadata["event_type"] = envelope.type
    return Entry(
        id=_event_id(envelope, stream_seq),
        org_id=chain_of(envelope.org_id),
        stream_seq=stream_seq,
        at=instant(envelope.occurred_at),
        actor=_actor(envelope.actor),
        subject_user_id=None,
        action=UNDECODABLE,
        resource_type="event",
        resource_id=_event_id(envelope, stream_seq),
        outcome="error",
        metadata=scrub(metadata),
        correlation_id=clean_id(envelope.correlation_id),
        trace_id=clean_id(trace_id_of(envelope.trace)),
    )


def _event_id(envelope: Envelope, stream_seq: int) -> str:
    return _id(envelope.event_id) if envelope.event_id else _stream_id(stream_seq)


def _stream_id(stream_seq: int) -> str:
    """Stable across rebuilds for a message that carries no event id of its own."""
    return str(uuid.uuid5(_NAMESPACE, f"stream:{stream_seq}"))


def _actor(actor: Actor) -> Actor:
    return Actor(
        kind=_id(actor.kind),
        id=_id(actor.id),
        key_id=clean_id(actor.key_id),
        ip=clean_id(actor.ip),
        user_agent=None if actor.user_agent is None else clean_text(actor.user_agent, 512),
    )


def _id(text: str) -> str:
    cleaned = clean_id(text)
    assert cleaned is not None
    return cleaned
