"""`cmd.<service>.stored_events`: a service's published events, read back from its own store.

Answered by every service that publishes through an outbox relay. A projection rebuilding
after the stream's retention dropped old events asks for the ones the stream lost: the
service replies only with events recorded before its oldest event still on the stream.
"""

import msgspec


class ReadStoredEvents(msgspec.Struct, kw_only=True):
    after: int = 0  # notification id to continue after
    limit: int = 200


class StoredEvent(msgspec.Struct, kw_only=True):
    notification_id: int
    subject: str
    envelope: msgspec.Raw  # exactly what the relay publishes for this event


class StoredEventsPage(msgspec.Struct, kw_only=True):
    events: list[StoredEvent]
    next_after: int
    done: bool
