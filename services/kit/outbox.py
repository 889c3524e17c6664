"""The outbox relay: from a service's event store to JetStream, in order, exactly once.

Events are recorded first (eventsourcing on PostgreSQL). The relay follows the store's
notification log and publishes each event with its event id as `Nats-Msg-Id` and its
notification id in a header. On start it reads the last message this service has on the
stream and resumes after that notification, so a crash between recording and publishing
loses nothing, and nothing already on the stream is published again.

A batch is published pipelined: every message is sent, then the acks are checked in order
(one awaited round trip per event cost ~0.2 ms and a write syscall each; pipelined, the
connection's flusher coalesces them). The acks come back as replies on the connection's one
reply subscription (`Replies.request_all`): nats-py's `publish_async` runs a `wait_for` task
per message, and cost 38 µs of CPU an event against 20 µs (`bench/floors.py`).
JetStream stores the messages of one connection in the order it received them, so the
stream still never holds a later event without the earlier ones: an ack that fails or does
not come means that message and, in practice, those after it were not stored. The relay
does not rely on that alone: from the first message whose ack failed it publishes again one
by one, awaiting each (`Nats-Msg-Id` drops what the stream already has); only if that fails
too does it stop and resume from the stream.

The relay also records how far it got in the service's own schema (at most every
`BOOKMARK_EVERY_S` while busy, when it falls idle, and at stop), and resumes from the larger
of the two positions: a stream whose retention dropped all of a service's events must not
make the relay publish the whole history again. The stream's own position comes first, so a
bookmark a second behind only matters if retention also dropped this service's newest
events, and then `Nats-Msg-Id` still drops what is re-sent within the 120 s window.

A writer of the same process may also `feed` the relay the rows it has just committed, with
their domain events: when they follow the relay's position directly, it publishes them
without reading them back from the store and decoding them again (with a fact per tool call,
that read was about a tenth of quota's CPU and a twentieth of mcp_proxy's, py-spy). Anything else (rows of
another writer or instance in between, a `nudge` from a save it was not fed, a relay that
just took over) sends it back to the store, which stays the source of truth.
"""

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, NamedTuple

import msgspec
from eventsourcing.application import Application
from eventsourcing.persistence import Notification
from nats.aio.msg import Msg
from nats.js.api import Header
from nats.js.errors import NotFoundError
from psycopg.sql import SQL, Identifier

from contracts.envelope import Actor, Envelope, TraceContext, encode_envelope, payload_bytes
from contracts.events import event_type_of
from contracts.subjects import STREAM, event_subject, service_events
from services.kit import failpoints, telemetry
from services.kit.bus import Bus
from services.kit.ids import uuid5_text
from services.kit.lease import Lease
from services.kit.replies import replies
from services.kit.tasks import stop_task

log = logging.getLogger(__name__)

NOTIFICATION_HEADER = "Gatehouse-Notification-Id"
BOOKMARK_EVERY_S = 1.0
ACK_TIMEOUT_S = 5.0
_EXPECTED_STREAM = Header.EXPECTED_STREAM.value  # the stream refuses a message meant for another
BATCH = 200  # notifications per store read and per pipelined publish
FED_MAX = 10_000  # rows kept from `feed`; past it the store is read instead
EVENT_NAMESPACE = uuid.UUID("6f1d8a52-2c55-4c9e-9a43-5a1f0c1a9d11")


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: `{"stream": ..., "seq": ...}`, or `{"error": {...}}`."""

    stream: str = ""
    seq: int = 0
    error: dict[str, Any] | None = None


_pub_ack = msgspec.json.Decoder(_PubAck)


def stored(reply: Msg | None) -> bool:
    """Whether this reply to a publish says the stream holds the message (a duplicate counts:
    the stream had it already). No reply, a no-responders status or an error: not stored."""
    if reply is None or reply.headers:  # acks carry no headers; statuses (503) do
        return False
    try:
        ack = _pub_ack.decode(reply.data)
    except msgspec.DecodeError:
        return False
    return ack.error is None and ack.stream == STREAM and ack.seq > 0


class Outgoing(msgspec.Struct):
    """What a service's translator makes of one recorded domain event."""

    payload: msgspec.Struct
    org_id: str | None
    meta: dict[str, Any]


Translator = Callable[[Any], Outgoing | None]
Fed = tuple[Notification, Any]  # a committed row and its domain event (None: decode the row)


class _Message(NamedTuple):
    subject: str
    body: bytes
    headers: dict[str, str]


def event_id_for(notification: Notification) -> str:
    """Stable across re-reads of the store: the same recorded event always gets the same id."""
    return uuid5_text(EVENT_NAMESPACE, f"{notification.originator_id}:{notification.originator_version}")


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
        self._position = 0  # the last notification published by this relay
        self._bookmarked = 0  # ... and the last one written to the bookmark
        self._wake = asyncio.Event()
        self._fed: deque[Fed] = deque()
        self._following = False  # only then is `feed` kept
        self._unfed = True  # the store may hold rows `_fed` lacks: read it next
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
            self._loop.call_soon_threadsafe(self._stored)

    def _stored(self) -> None:
        self._unfed = True
        self._wake.set()

    def feed(self, rows: Sequence[Fed]) -> None:
        """On the event loop, after a writer of this process committed `rows` (ascending ids):
        kept for the relay's next pass, which `wake` starts (a writer may wake it later, to
        gather several batches into one pass)."""
        if self._following and len(self._fed) < FED_MAX:
            self._fed.extend(rows)

    def wake(self) -> None:
        """On the event loop: look for new rows now."""
        self._wake.set()

    def _from_memory(self, position: int) -> list[Fed] | None:
        """The fed rows right after `position`, or None when the store must be read."""
        fed = self._fed
        while fed and fed[0][0].id <= position:
            fed.popleft()
        if self._unfed or not fed or fed[0][0].id != position + 1:
            return None
        batch: list[Fed] = []
        expected = position + 1
        while fed and len(batch) < BATCH and fed[0][0].id == expected:
            batch.append(fed.popleft())
            expected += 1
        return batch

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
                await self._bookmark()
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

    async def _bookmark(self) -> None:
        if self._position > self._bookmarked:
            position = self._position
            await self._in_thread(self._record_position, position)
            self._bookmarked = position

    async def _follow(self, position: int) -> None:
        self._following, self._unfed = True, True
        try:
            await self._follow_from(position)
        finally:
            self._following = False
            self._fed.clear()

    async def _follow_from(self, position: int) -> None:
        renew_every = self._lease.ttl / 3
        loop = asyncio.get_running_loop()
        renewed_at = bookmarked_at = loop.time()
        self._position = self._bookmarked = position
        while not self._stopping:
            if loop.time() - renewed_at > renew_every:
                if not await self._lease.renew():
                    raise RuntimeError("relay lease lost")
                renewed_at = loop.time()
            self._wake.clear()
            batch = self._from_memory(position)
            if batch is None:
                self._unfed = False  # before the read: a save after it nudges again
                batch = [(n, None) for n in await self._in_thread(self._select, position)]
            if batch:
                await self._publish_all(batch)
                position = self._position = batch[-1][0].id
                if loop.time() - bookmarked_at >= BOOKMARK_EVERY_S:
                    await self._bookmark()
                    bookmarked_at = loop.time()
            if len(batch) < BATCH and not (self._fed and self._fed[0][0].id == position + 1):
                try:
                    async with asyncio.timeout(self.poll_s):
                        await self._wake.wait()
                except TimeoutError:  # idle: a good moment for the bookmark
                    await self._bookmark()
                    bookmarked_at = loop.time()

    def _select(self, position: int) -> list[Notification]:
        recorder = self.app.recorder
        return list(recorder.select_notifications(position, BATCH, None, (), inclusive_of_start=False))

    def _message(self, row: Fed) -> _Message | None:
        notification, domain_event = row
        if domain_event is None:
            domain_event = self.app.mapper.to_domain_event(notification)
        out = self.translate(domain_event)
        if out is None:
            return None
        occurred_at: datetime = getattr(domain_event, "timestamp")  # noqa: B009 - aggregate events have it
        envelope = envelope_for(notification, occurred_at, out)
        headers = telemetry.inject(
            {
                "Nats-Msg-Id": envelope.event_id,
                NOTIFICATION_HEADER: str(notification.id),
                _EXPECTED_STREAM: STREAM,
            },
            envelope.trace,
        )
        return _Message(event_subject(envelope.type), encode_envelope(envelope), headers)

    async def _publish_all(self, batch: list[Fed]) -> None:
        """Sends every message of the batch, then checks the acks in order (module docstring)."""
        messages = [m for m in map(self._message, batch) if m is not None]
        if not messages:
            return
        await failpoints.stall_if("relay.before_publish")
        acks = await replies(self.bus.nc).request_all(
            [(m.subject, m.body, m.headers) for m in messages],
            ACK_TIMEOUT_S,
        )
        unconfirmed = [i for i, ack in enumerate(acks) if not stored(ack)]
        if unconfirmed:
            failed = unconfirmed[0]
            log.warning(
                "outbox relay for %s: %d of %d publishes unconfirmed; sending them again in order",
                self.service,
                len(acks) - failed,
                len(acks),
            )
            for m in messages[failed:]:
                await self.bus.js.publish(m.subject, m.body, stream=STREAM, headers=dict(m.headers))
        self.published += len(messages)
