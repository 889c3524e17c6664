"""The logs a ledger is loaded or rebuilt from: the quota store, and the public stream."""

import asyncio
import logging
from datetime import datetime

import msgspec
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from contracts.envelope import Envelope, decode_envelope
from contracts.events import decode_payload
from contracts.events import quota as ev
from contracts.subjects import STREAM, service_events
from services.kit.bus import Bus
from services.kit.outbox import NOTIFICATION_HEADER
from services.quota.adapters.store import QuotaStore, WriterEvents, fact_of
from services.quota.domain import Committed, Fact, Ledger, Released, Reserved

log = logging.getLogger(__name__)


class Loaded(msgspec.Struct, frozen=True):
    position: int  # last notification id
    fence: int  # the writer seal's last version
    events: int


def load(store: QuotaStore, ledger: Ledger, up_to: int | None = None) -> Loaded:
    """Folds the store's whole notification log into `ledger` (synchronous: run it in a thread)."""
    position = fence = events = 0
    for notification_id, event in store.read(0, up_to):
        position = notification_id
        events += 1
        if isinstance(event, WriterEvents.Sealed):
            fence = max(fence, event.originator_version)
            continue
        fact = fact_of(event)
        if fact is not None:
            ledger.apply(fact)
    return Loaded(position, fence, events)


class StoreSource:
    name = "store"

    def __init__(self, store: QuotaStore) -> None:
        self.store = store

    async def fold(self, ledger: Ledger, up_to: int) -> None:
        if up_to:
            await asyncio.to_thread(load, self.store, ledger, up_to)


def fact_from_stream(envelope: Envelope) -> Fact | None:
    payload = decode_payload(envelope)
    if isinstance(payload, ev.Reserved):
        return _opened(payload, payload.reservation_id, payload.expires_at, lease=payload.lease)
    if isinstance(payload, ev.UsageRecorded) and not payload.held:  # unmetered, or a lease's unit
        return _opened(payload, payload.usage_id, None, charged=True, from_lease=payload.lease_id)
    if isinstance(payload, ev.UsageRecorded):
        return Committed(reservation_id=payload.usage_id, version=payload.version, at=payload.recorded_at)
    if isinstance(payload, ev.Committed):
        return Committed(
            reservation_id=payload.reservation_id, version=payload.version, at=envelope.occurred_at
        )
    if isinstance(payload, ev.Released):
        return Released(
            reservation_id=payload.reservation_id,
            version=payload.version,
            at=envelope.occurred_at,
            reason=payload.reason,
            was_committed=payload.was_committed,
        )
    return None


class StreamSource:
    """`events.quota.>` on GATEHOUSE_EVENTS, read from the start up to a store position."""

    name = "stream"

    def __init__(self, bus: Bus, catch_up_timeout: float = 300.0) -> None:
        self.bus, self.catch_up_timeout = bus, catch_up_timeout

    async def published(self) -> int:
        """Notification id of the newest quota event on the stream (0: none)."""
        try:
            msg = await self.bus.js.get_last_msg(STREAM, service_events("quota"))
        except NotFoundError:
            return 0
        return int((msg.headers or {}).get(NOTIFICATION_HEADER, 0))

    async def fold(self, ledger: Ledger, up_to: int) -> None:
        if not up_to:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.catch_up_timeout
        while await self.published() < up_to:  # the outbox relay is still publishing
            if loop.time() > deadline:
                raise TimeoutError(f"the stream did not reach quota notification {up_to} in time")
            await asyncio.sleep(0.05)
        sub = await self.bus.js.subscribe(
            service_events("quota"), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, stream=STREAM
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=10)
                except NatsTimeout:
                    raise TimeoutError("the stream stopped delivering before the live position") from None
                notification = int((msg.headers or {}).get(NOTIFICATION_HEADER, 0))
                if notification > up_to:
                    return
                try:
                    fact = fact_from_stream(decode_envelope(msg.data))
                except (msgspec.DecodeError, msgspec.ValidationError) as err:
                    ledger.anomalies.append(f"stream seq {msg.metadata.sequence.stream} undecodable: {err}")
                    fact = None
                if fact is not None:
                    ledger.apply(fact)
                if notification == up_to:
                    return
        finally:
            await sub.unsubscribe()


def _opened(
    payload: ev.Reserved | ev.UsageRecorded,
    rid: str,
    expires_at: datetime | None,
    charged: bool = False,
    lease: bool = False,
    from_lease: str | None = None,
) -> Reserved:
    return Reserved(
        reservation_id=rid,
        version=payload.version,
        key=payload.key,
        user_id=payload.user_id,
        org_id=payload.org_id,
        kind=payload.kind,  # type: ignore[arg-type]
        amount=payload.amount,
        tier=payload.tier,
        period_start=payload.period_start,
        at=payload.reserved_at,
        expires_at=expires_at,
        charged=charged,
        lease=lease,
        from_lease=from_lease,
    )
