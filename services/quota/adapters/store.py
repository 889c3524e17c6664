"""The quota event store: eventsourcing on PostgreSQL, schema `quota`, written in batches.

Each reservation is an event-sourced aggregate whose id derives from (user, key): its
events are Reserved (version 1), then Committed and/or Released, then Reserved again if a
released key is reused. The deciding instance keeps every reservation in memory and so
never loads one from here; it folds the whole notification log when it starts.

Every batch also appends the next version of one `Writer` aggregate (`Sealed`). Two
instances that both believe they decide cannot both commit a batch on the same version:
the second fails on eventsourcing's (originator id, version) uniqueness, reloads, and
decides again from what the first recorded. So the store never holds a batch decided on
a stale ledger, whatever the lease did. That also serialises the writers' transactions,
which keeps notification ids in commit order for the outbox relay without the table lock
(see adapters/writer.py, which inserts the batches).
"""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from eventsourcing.application import Application
from eventsourcing.domain import DomainEvent
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import get_topic, resolve_topic

from services.quota.domain import Committed, Fact, Refused, Released, Reservation, Reserved

WRITER_ID = uuid.UUID("8d0e4f63-2b1a-4c7e-9f35-0a6b5c4d3e21")
Meta = dict[str, Any]


class ReservationEvents:
    """The events of one reservation aggregate (namespaced so their topics read well)."""

    @dataclass(frozen=True)
    class Reserved(DomainEvent):
        key: str
        user_id: str
        org_id: str
        kind: str
        amount: int
        tier: str
        period_start: datetime
        expires_at: datetime | None
        meta: Meta
        charged: bool = False  # an unmetered call, charged without a hold (ledger.record_use)
        lease: bool = False  # a lease of `amount` calls
        from_lease: str | None = None  # charged: the lease whose unit it spent

    @dataclass(frozen=True)
    class Committed(DomainEvent):
        key: str
        user_id: str
        org_id: str
        kind: str
        amount: int
        tier: str
        period_start: datetime
        reserved_at: datetime
        meta: Meta

    @dataclass(frozen=True)
    class Released(DomainEvent):
        key: str
        user_id: str
        org_id: str
        kind: str
        amount: int
        period_start: datetime
        reason: str
        was_committed: bool
        meta: Meta


class RefusalEvents:
    @dataclass(frozen=True)
    class Recorded(DomainEvent):
        user_id: str
        org_id: str
        kind: str
        amount: int
        tier: str
        used: int
        limit: int
        sentence: str
        key: str
        meta: Meta


class WriterEvents:
    @dataclass(frozen=True)
    class Sealed(DomainEvent):
        holder: str
        events: int


def recordable(fact: Fact, reservation: Reservation | None, meta: Meta) -> DomainEvent:
    """The stored form of a fact; `reservation` is the fact's reservation as it was before it."""
    if isinstance(fact, Reserved):
        return ReservationEvents.Reserved(
            originator_id=uuid.UUID(fact.reservation_id),
            originator_version=fact.version,
            timestamp=fact.at,
            key=fact.key,
            user_id=fact.user_id,
            org_id=fact.org_id,
            kind=fact.kind,
            amount=fact.amount,
            tier=fact.tier,
            period_start=fact.period_start,
            expires_at=fact.expires_at,
            meta=meta,
            charged=fact.charged,
            lease=fact.lease,
            from_lease=fact.from_lease,
        )
    if isinstance(fact, Refused):
        return RefusalEvents.Recorded(
            originator_id=uuid.uuid4(),
            originator_version=1,
            timestamp=fact.at,
            user_id=fact.user_id,
            org_id=fact.org_id,
            kind=fact.kind,
            amount=fact.amount,
            tier=fact.tier,
            used=fact.used,
            limit=fact.limit,
            sentence=fact.sentence,
            key=fact.key,
            meta=meta,
        )
    assert reservation is not None
    r = reservation
    if isinstance(fact, Committed):
        return ReservationEvents.Committed(
            originator_id=uuid.UUID(fact.reservation_id),
            originator_version=fact.version,
            timestamp=fact.at,
            key=r.key,
            user_id=r.user_id,
            org_id=r.org_id,
            kind=r.kind,
            amount=r.amount,
            tier=r.tier,
            period_start=r.period_start,
            reserved_at=r.reserved_at,
            meta=meta,
        )
    return ReservationEvents.Released(
        originator_id=uuid.UUID(fact.reservation_id),
        originator_version=fact.version,
        timestamp=fact.at,
        key=r.key,
        user_id=r.user_id,
        org_id=r.org_id,
        kind=r.kind,
        amount=r.amount,
        period_start=r.period_start,
        reason=fact.reason,
        was_committed=fact.was_committed,
        meta=meta,
    )


def fact_of(event: Any) -> Fact | None:
    """The ledger fact a stored event records (None for refusals and writer seals)."""
    if isinstance(event, ReservationEvents.Reserved):
        return Reserved(
            reservation_id=str(event.originator_id),
            version=event.originator_version,
            key=event.key,
            user_id=event.user_id,
            org_id=event.org_id,
            kind=event.kind,  # type: ignore[arg-type]
            amount=event.amount,
            tier=event.tier,
            period_start=event.period_start,
            at=event.timestamp,
            expires_at=event.expires_at,
            charged=event.charged,
            lease=event.lease,
            from_lease=event.from_lease,
        )
    if isinstance(event, ReservationEvents.Committed):
        return Committed(
            reservation_id=str(event.originator_id), version=event.originator_version, at=event.timestamp
        )
    if isinstance(event, ReservationEvents.Released):
        return Released(
            reservation_id=str(event.originator_id),
            version=event.originator_version,
            at=event.timestamp,
            reason=event.reason,
            was_committed=event.was_committed,
        )
    return None


class QuotaMapper(Mapper[uuid.UUID]):
    """Stored state is the event encoded by msgspec (~1 us each way, against ~13 us for
    eventsourcing's JSON transcoder: the writer and the outbox relay pay it on every fact).
    Compression and encryption are not used for quota events."""

    _encoder = msgspec.json.Encoder()
    _decoders: dict[str, tuple[type[DomainEvent], msgspec.json.Decoder[Any]]] = {}

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        return StoredEvent(
            originator_id=domain_event.originator_id,
            originator_version=domain_event.originator_version,
            topic=get_topic(type(domain_event)),
            state=self._encoder.encode(domain_event),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        known = self._decoders.get(stored_event.topic)
        if known is None:
            cls = resolve_topic(stored_event.topic)
            known = self._decoders[stored_event.topic] = (cls, msgspec.json.Decoder(cls))
        return known[1].decode(stored_event.state)


class QuotaStore(Application[uuid.UUID]):
    name = "quota"

    def construct_mapper(self) -> Mapper[uuid.UUID]:
        return QuotaMapper(transcoder=self.construct_transcoder())

    def seal(self, version: int, holder: str, events: int, at: datetime) -> DomainEvent:
        return WriterEvents.Sealed(
            originator_id=WRITER_ID, originator_version=version, timestamp=at, holder=holder, events=events
        )

    def read(self, after: int = 0, up_to: int | None = None, batch: int = 2000) -> Iterator[tuple[int, Any]]:
        """(notification id, domain event) from `after` (exclusive) to `up_to` (inclusive)."""
        position = after
        while True:
            notifications = self.recorder.select_notifications(
                position, batch, up_to, (), inclusive_of_start=False
            )
            for notification in notifications:
                yield notification.id, self.mapper.to_domain_event(notification)
                position = notification.id
            if len(notifications) < batch:
                return
