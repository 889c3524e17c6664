"""Events the stream no longer holds, read back from the services' own event stores.

Serving side (`serve_stored_events`, one line in each service with an outbox relay): the
events the relay would publish, translated by the same code (`envelope_for` + the service's
translator), limited to those recorded before the service's oldest event still on the stream
(or, when the stream holds none of its events, up to the last one its relay published: the
relay's bookmark, or the running relay's own position when that is newer).

Asking side (`StoredHistory`): every service is asked; the answers are merged into one
order: each service's events stay in notification order, and services are interleaved by
`occurred_at` (then service name), which is the order the stream had them in whenever the
relays published in the order things happened. A service that does not answer is skipped
and named in the log (replay again once it runs).
"""

import asyncio
import heapq
import logging
from datetime import UTC, datetime

import msgspec
from nats.js.errors import NotFoundError

from contracts.commands.stored_events import ReadStoredEvents, StoredEvent, StoredEventsPage
from contracts.envelope import decode_envelope, encode_envelope
from contracts.subjects import SERVICES, STREAM, event_subject, service_events
from services.kit.bus import Bus
from services.kit.outbox import NOTIFICATION_HEADER, OutboxRelay, envelope_for
from services.kit.rpc import CommandClient, CommandFailed, CommandServer

log = logging.getLogger(__name__)
VERB = "stored_events"
PAGE_BYTES = 512 * 1024  # stay well under NATS's default 1 MB max payload


def serve_stored_events(server: CommandServer, relay: OutboxRelay) -> None:
    async def handle(c: ReadStoredEvents) -> StoredEventsPage:
        bound = await _oldest_on_stream(relay)
        if bound is None:
            # The bookmark is written at most once a second (and when the relay falls idle):
            # what this instance's relay confirmed since then is published too, and lost.
            bound = max(await asyncio.to_thread(relay._recorded_position), relay._position) + 1
        return await asyncio.to_thread(_page, relay, c.after, max(1, min(c.limit, 1000)), bound)

    server.route(VERB, ReadStoredEvents, handle)


async def _oldest_on_stream(relay: OutboxRelay) -> int | None:
    """The notification id of the service's oldest event on the stream (None if it has none)."""
    js = relay.bus.js
    try:
        info = await js.stream_info(STREAM)
        msg = await js.get_msg(
            STREAM, seq=max(info.state.first_seq, 1), subject=service_events(relay.service), next=True
        )
    except NotFoundError:
        return None
    value = (msg.headers or {}).get(NOTIFICATION_HEADER)
    return int(value) if value else None


def _page(relay: OutboxRelay, after: int, limit: int, bound: int) -> StoredEventsPage:
    if after + 1 >= bound:
        return StoredEventsPage(events=[], next_after=after, done=True)
    app = relay.app
    notifications = list(
        app.recorder.select_notifications(after, limit, bound - 1, (), inclusive_of_start=False)
    )
    events: list[StoredEvent] = []
    size, position = 0, after
    for notification in notifications:
        position = notification.id
        domain_event = app.mapper.to_domain_event(notification)
        out = relay.translate(domain_event)
        if out is not None:
            envelope = envelope_for(notification, getattr(domain_event, "timestamp"), out)  # noqa: B009
            raw = encode_envelope(envelope)
            events.append(
                StoredEvent(
                    notification_id=notification.id,
                    subject=event_subject(envelope.type),
                    envelope=msgspec.Raw(raw),
                )
            )
            size += len(raw)
        if size > PAGE_BYTES:
            break
    done = len(notifications) < limit and position == (notifications[-1].id if notifications else after)
    done = done or position >= bound - 1
    return StoredEventsPage(events=events, next_after=position, done=done)


class Restored(msgspec.Struct):
    subject: str
    raw: bytes
    occurred_at: datetime
    service: str
    notification_id: int


class StoredHistory:
    """What every service still has in its store of what the stream lost."""

    def __init__(self, bus: Bus, services: tuple[str, ...] = SERVICES, timeout: float = 60.0) -> None:
        self.bus, self.services, self.timeout = bus, services, timeout

    async def missing(self) -> tuple[list[Restored], list[str]]:
        """The lost events in one order, and the services that had some."""
        per_service: list[list[Restored]] = []
        gave: list[str] = []
        for service in self.services:
            events = await self._of(service)
            if events:
                per_service.append(events)
                gave.append(service)
        merged = heapq.merge(*per_service, key=lambda r: (r.occurred_at, r.service, r.notification_id))
        return list(merged), gave

    async def _of(self, service: str) -> list[Restored]:
        client = CommandClient(self.bus)
        out: list[Restored] = []
        after = 0
        while True:
            try:
                page = await client.call(
                    service, VERB, ReadStoredEvents(after=after), StoredEventsPage, timeout=self.timeout
                )
            except CommandFailed as err:
                if out or err.problem.status != 503:
                    raise
                log.info("%s gave no stored events (%s)", service, err.problem.detail)
                return out
            for event in page.events:
                raw = bytes(event.envelope)
                at = decode_envelope(raw).occurred_at
                at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
                out.append(Restored(event.subject, raw, at, service, event.notification_id))
            if page.done or page.next_after <= after:
                return out
            after = page.next_after


__all__ = ["Restored", "StoredHistory", "serve_stored_events"]
