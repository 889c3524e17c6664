"""The outbox relay: from a service's event store to JetStream, in order, exactly once.

Events are recorded first (eventsourcing on PostgreSQL). The relay follows the store's
notification log and publishes each event with its event id as `Nats-Msg-Id` and its
notification id in a header. On start it reads the last message this service has on the
stream and resumes after that notification, so a crash between recording and publishing
loses nothing, and nothing already on the stream is published again. Publishes are awaited
one by one so the stream never holds a later event without the earlier ones.

The relay also records how far it got in the service's own schema (after each batch), and
resumes from the larger of the two positions: a stream whose retention dropped all of a
service's events must not make the relay publish the whole history again.
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import msgspec
from eventsourcing.application import Application
from eventsourcing.persistence import Notification
from nats.js.errors import NotFoundError
from psycopg.sql import SQL, Identifier

from contracts.envelope import Actor, Envelope, TraceContext, encode_envelope, payload_bytes
from contracts.events import event_type_of
from contracts.subjects import STREAM, event_subject, service_events
from services.kit import failpoints, telemetry
from services.kit.bus import Bus
from services.kit.lease import Lease
from services.kit.tasks import stop_task

log = logging.getLogger(__name__)

NOTIFICATION_HEADER = "Gatehouse-Notification-Id"
EVENT_NAMESPACE = uuid.UUID("6f1d8a52-2c55-4c9e-9a43-5a1f0c1a9d11")


class Outgoing(msgspec.Struct):
    """What a service's translator makes of one recorded domain event."""

    payload: msgspec.Struct
    org_id: str | None
    meta: dict[str, Any]


Translator = Callable[[Any], Outgoing | None]


def event_id_for(notification: Notification) -> str:
    """Stable across re-reads of the store: the same recorded event always gets the same id."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{notification.originator_id}:{notification.originator_version}"))


def envelope_for(notification: Notification, occurred_at: datetime, out: Outgoing) -> Envelope:
    meta = out.meta or {}
    actor = msgspec.convert(meta.get("actor") or {"kind": "service", "id": "gatehouse"}, Actor)
    trace = msgspec.convert(meta.get("trace") or {}, TraceContext)
    return Envelope(
        event_id=event_id_for(notification),
        type=event_type_of(out.payload),
        schema_version=1,
        occurred_at=occurred_at,
        org_id=out.org_id,
        actor=actor,
        correlation_id=str(meta.get("correlation_id") or event_id_for(notification)),
        trace=trace,
        data=payload_bytes(out.payload),
    )


class OutboxRelay:
    def __init__(
        self, service: str, app: Application, bus: Bus, translate: Translator, poll_s: float = 0.5
    ) -> None:
        self.service, self.app, self.bus, self.translate = service, app, bus, translate
        self.poll_s = poll_s
        self.published = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._lease = Lease(bus, f"relay.{service}", holder=str(uuid.uuid4()))
        # Store reads get their own thread: command handlers saturating the default pool
        # must not hold back publication.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"outbox-{service}")
        schema = getattr(self.app.recorder, "datastore", None)
        self._table = (
            SQL("{}.outbox_position").format(Identifier(schema.schema)) if schema is not None else None
        )

    def nudge(self) -> None:
        """Called from any thread after the application saved new events."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"outbox-{self.service}")

    async def stop(self) -> None:
        """Bounded: a stop must not hang on a store read or a NATS call in flight.

        Python 3.11's `wait_for` (inside nats-py too) can swallow a cancellation, so the loops
        also check `_stopping`, and the task is cancelled again until it ends.
        """
        self._stopping = True
        if self._task:
            await stop_task(self._task, patience_s=5)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._lease.release()
        self._executor.shutdown(wait=False)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _recorded_position(self) -> int:
        """The relay's own bookmark in the service's schema (0 when it has none)."""
        if self._table is None:
            return 0
        with self.app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            conn.execute(
                SQL(
                    "CREATE TABLE IF NOT EXISTS {} (id int PRIMARY KEY, notification_id bigint NOT NULL)"
                ).format(self._table)
            )
            row = conn.execute(
                SQL("SELECT notification_id FROM {} WHERE id = 1").format(self._table)
            ).fetchone()
            return int(row["notification_id"]) if row else 0

    def _record_position(self, position: int) -> None:
        if self._table is None:
            return
        with self.app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            conn.execute(
                SQL(
                    "INSERT INTO {} (id, notification_id) VALUES (1, %s) ON CONFLICT (id) DO UPDATE "
                    "SET notification_id = GREATEST({}.notification_id, EXCLUDED.notification_id)"
                ).format(self._table, self._table),
                [position],
            )

    async def last_published(self) -> int:
        """The notification id of this service's newest event on the stream (0 if none)."""
        try:
            msg = await self.bus.js.get_last_msg(STREAM, service_events(self.service))
        except NotFoundError:
            return 0
        return int((msg.headers or {}).get(NOTIFICATION_HEADER, 0))

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping:
            try:
                await self._lease.acquire()
                on_stream = await self.last_published()
                position = max(on_stream, await self._in_thread(self._recorded_position))
                log.info("outbox relay for %s resumes after notification %d", self.service, position)
                await self._follow(position)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # NATS or PostgreSQL away: wait, then resume from the stream
                log.warning("outbox relay for %s paused: %s", self.service, err)
                await self._lease.release()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.2

    async def _follow(self, position: int) -> None:
        renew_every = self._lease.ttl / 3
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        while not self._stopping:
            if loop.time() - renewed_at > renew_every:
                if not await self._lease.renew():
                    raise RuntimeError("relay lease lost")
                renewed_at = loop.time()
            self._wake.clear()
            batch = await self._in_thread(self._select, position)
            for notification in batch:
                await self._publish(notification)
                position = notification.id
            if batch:
                await self._in_thread(self._record_position, position)
            if len(batch) < 200:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self._wake.wait()

    def _select(self, position: int) -> list[Notification]:
        return list(self.app.recorder.select_notifications(position, 200, None, (), inclusive_of_start=False))

    async def _publish(self, notification: Notification) -> None:
        domain_event = self.app.mapper.to_domain_event(notification)
        out = self.translate(domain_event)
        if out is None:
            return
        occurred_at: datetime = getattr(domain_event, "timestamp")  # noqa: B009 - aggregate events have it
        envelope = envelope_for(notification, occurred_at, out)
        await failpoints.stall_if("relay.before_publish")
        headers = telemetry.inject(
            {"Nats-Msg-Id": envelope.event_id, NOTIFICATION_HEADER: str(notification.id)},
            envelope.trace,
        )
        await self.bus.js.publish(
            event_subject(envelope.type), encode_envelope(envelope), stream=STREAM, headers=headers
        )
        self.published += 1
