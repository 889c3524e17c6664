"""An idempotent projection fed by a durable JetStream consumer.

Each batch is applied in one PostgreSQL transaction together with the consumer's position
(the last stream sequence applied). A message at or below that position is skipped, so a
redelivered or replayed event lands exactly once. A failing batch is rolled back and nak'ed:
JetStream redelivers it (bounded by `max_deliver`), unlike faststream's default policy which
drops a message whose handler raised.

Order matters (the audit hash chain is built in stream order), so no newer message may
overtake a redelivered one: naks carry no delay (redeliveries are served before new
messages) and the back-off happens here, with no fetch outstanding; `max_ack_pending`
equals the batch size; and at start, the durable consumer is re-pointed at the position
stored in PostgreSQL, which is the source of truth. One instance projects at a time (lease).
A database outage spends no deliveries: the batch is held (marked in progress) and retried
until PostgreSQL answers again.
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import psycopg
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from psycopg.sql import SQL, Identifier

from contracts.envelope import Envelope, decode_envelope
from contracts.events import decode_payload
from contracts.subjects import STREAM
from services.kit.bus import Bus
from services.kit.lease import Lease
from services.kit.tasks import stop_task

log = logging.getLogger(__name__)


class Delivered(msgspec.Struct):
    """One message from the stream, decoded as far as this reader understands it."""

    stream_seq: int
    subject: str
    raw: bytes
    envelope: Envelope | None  # None: not an envelope at all (poison)
    payload: msgspec.Struct | None  # None: unknown type or undecodable payload
    error: str | None = None


def decode_delivered(stream_seq: int, subject: str, raw: bytes) -> Delivered:
    try:
        envelope = decode_envelope(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        return Delivered(stream_seq, subject, raw, None, None, f"undecodable envelope: {err}")
    try:
        payload = decode_payload(envelope)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        return Delivered(stream_seq, subject, raw, envelope, None, f"undecodable payload: {err}")
    return Delivered(stream_seq, subject, raw, envelope, payload)


Apply = Callable[[psycopg.AsyncConnection[Any], Delivered], Awaitable[None]]


class ProjectionConsumer:
    def __init__(
        self,
        *,
        bus: Bus,
        database_url: str,
        schema: str,
        name: str,
        filter_subject: str,
        apply: Apply,
        batch: int = 256,
        max_deliver: int = 20,
    ) -> None:
        self.bus, self.database_url, self.schema, self.name = bus, database_url, schema, name
        self.filter_subject, self.apply, self.batch = filter_subject, apply, batch
        self.max_deliver = max_deliver
        self.applied = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._conn: psycopg.AsyncConnection[Any] | None = None
        # One connection, used by the consumer task and by `position()` callers (health,
        # digests): transactions on it must not interleave.
        self._conn_lock = asyncio.Lock()
        self._positions = SQL("{}.projection_positions").format(Identifier(schema))
        self._lease = Lease(bus, f"projection.{name}", holder=str(uuid.uuid4()), ttl=10.0)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"projection-{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            await stop_task(self._task, patience_s=5)
            self._task = None
        self._stopping = False
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def position(self) -> int:
        async with self._conn_lock:
            conn = await self._connection()
            async with conn.transaction():
                return await self._read_position(conn)

    async def rebuild(self, reset: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]) -> None:
        """Drops the projection (via `reset`) and the consumer, then replays the stream."""
        await self.stop()
        try:
            await self.bus.js.delete_consumer(STREAM, self.name)
        except NotFoundError:
            pass
        async with self._conn_lock:
            conn = await self._connection()
            async with conn.transaction():
                await reset(conn)
                await conn.execute(SQL("DELETE FROM {} WHERE name = %s").format(self._positions), [self.name])
        await self.start()
        await asyncio.sleep(0.1)
        await self.wait_caught_up()

    async def wait_caught_up(self, timeout: float = 600.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                info = await self.bus.js.consumer_info(STREAM, self.name)
            except NotFoundError:
                info = None  # not (re)created yet
            if info is not None and info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"projection {self.name} did not catch up in {timeout}s")

    # -- internals -------------------------------------------------------------------
    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(self.database_url, connect_timeout=5)
            async with self._conn.transaction():
                await self._conn.execute(
                    SQL(
                        "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, stream_seq bigint NOT NULL)"
                    ).format(self._positions)
                )
        return self._conn

    async def _read_position(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute(
            SQL("SELECT stream_seq FROM {} WHERE name = %s FOR UPDATE").format(self._positions),
            [self.name],
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _align_consumer(self) -> None:
        """(Re)creates the durable consumer so that it delivers from position + 1."""
        position = await self.position()
        try:
            await self.bus.js.delete_consumer(STREAM, self.name)
        except NotFoundError:
            pass
        config = ConsumerConfig(
            durable_name=self.name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if position else DeliverPolicy.ALL,
            opt_start_seq=position + 1 if position else None,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_deliver=self.max_deliver,
            max_ack_pending=self.batch,
            filter_subject=self.filter_subject,
        )
        await self.bus.js.add_consumer(STREAM, config)

    async def _run(self) -> None:
        backoff = 0.2
        sub = None
        loop = asyncio.get_running_loop()
        held = False
        renewed_at = loop.time()
        try:
            while not self._stopping:
                try:
                    if not held:  # inside the retry loop: a failure here must not end the task
                        await self._lease.acquire()
                        held, renewed_at = True, loop.time()
                    if sub is None:
                        await self._align_consumer()
                        sub = await self.bus.js.pull_subscribe_bind(self.name, stream=STREAM)
                    if loop.time() - renewed_at > self._lease.ttl / 3:
                        if not await self._lease.renew():
                            raise RuntimeError("projection lease lost")
                        renewed_at = loop.time()
                    try:
                        msgs = await sub.fetch(self.batch, timeout=1.0)
                    except NatsTimeout:
                        continue
                    await self._handle(msgs)
                    backoff = 0.2
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    log.warning("projection %s paused: %r", self.name, err)
                    if sub is not None:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                        sub = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    if "lease lost" in str(err):
                        held = False
        finally:
            if sub is not None:
                with contextlib.suppress(BaseException):
                    await sub.unsubscribe()
            with contextlib.suppress(BaseException):
                await self._lease.release()

    async def _handle(self, msgs: list[Msg]) -> None:
        """Applies a batch; on failure, either waits for the database or lets JetStream redeliver."""
        backoff = 0.2
        while not self._stopping:
            try:
                await self._apply_batch(msgs)
                break
            except (psycopg.OperationalError, psycopg.InterfaceError) as err:
                # The database is away: keep the batch (no delivery is spent) and try again.
                log.warning("projection %s waits for PostgreSQL: %s", self.name, err)
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as err:
                # The handler failed: nak (no delay, so redeliveries come before newer
                # messages) and back off here, with no fetch outstanding.
                log.warning("projection %s failed on a batch: %r", self.name, err)
                for msg in msgs:
                    if msg.metadata.num_delivered >= self.max_deliver:
                        log.error(
                            "projection %s abandons stream seq %d after %d deliveries",
                            self.name,
                            msg.metadata.sequence.stream,
                            msg.metadata.num_delivered,
                        )
                    with contextlib.suppress(Exception):
                        await msg.nak()
                await asyncio.sleep(backoff)
                return
        self.applied += len(msgs)
        for msg in msgs:
            await msg.ack()

    async def _apply_batch(self, msgs: list[Msg]) -> None:
        async with self._conn_lock:
            conn = await self._connection()
            async with conn.transaction():
                position = await self._read_position(conn)
                start = position
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    if seq <= position:
                        continue  # already applied: a redelivery or a replay overlap
                    await self.apply(conn, decode_delivered(seq, msg.subject, msg.data))
                    position = seq
                if position != start:
                    await conn.execute(
                        SQL(
                            "INSERT INTO {} (name, stream_seq) VALUES (%s, %s) "
                            "ON CONFLICT (name) DO UPDATE SET stream_seq = EXCLUDED.stream_seq"
                        ).format(self._positions),
                        [self.name, position],
                    )


async def _cancel_until_done(task: asyncio.Task[None], rounds: int = 50) -> None:
    """Python 3.11's `wait_for` (used inside nats-py's fetch) can swallow a cancellation."""
    for _ in range(rounds):
        if task.done():
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
