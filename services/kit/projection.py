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

Speed: a projection that is far behind the stream (a rebuild, or a restart after a long
stop) first catches up with `read_stream` (large batches, no acks, the next batch in flight)
and only then attaches its durable consumer. Every batch, live or catch-up, is applied in one
transaction with the position, through `apply_batch` when the projection has one (the audit
trail writes a whole batch with a few statements), else event by event through `apply`.
"""

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
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
from services.kit.ahead import Ahead, StagingWorker
from services.kit.bus import Bus
from services.kit.history import StoredHistory
from services.kit.lease import Lease
from services.kit.pull import Puller
from services.kit.stream_reader import Record, read_stream
from services.kit.tasks import stop_task

log = logging.getLogger(__name__)
# Catch-up decodes a batch in slices of this many messages, yielding to the event loop in
# between: decoding a whole batch at once (~40 ms) let PostgreSQL drain the COPY being
# written and sit idle, so the two processes took turns instead of working at once.
_DECODE_SLICE = 200


class Delivered(msgspec.Struct):
    """One message from the stream, decoded as far as this reader understands it."""

    stream_seq: int
    subject: str
    raw: bytes
    envelope: Envelope | None  # None: not an envelope at all (poison)
    payload: msgspec.Struct | None  # None: unknown type or undecodable payload
    error: str | None = None
    prepared: Any = None  # what the projection's `prepare` made of it, ahead of the transaction


def seq_of(msg: Msg) -> int:
    """The message's stream sequence, read from its ack subject (`$JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>...`) without `Msg.metadata`, which also builds a datetime and
    the rest (a tenth of a projection's decoding); other subject forms go through it."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5])
    return int(msg.metadata.sequence.stream)


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


# What live projections that only feed reads (audit, call history) wait for a fuller batch
# after one that was not full: a tool call's events come from two relays up to ~70 ms apart
# (mcp_proxy reports its uses every 50 ms, quota's relay wakes every 20 ms), so they usually
# share one transaction. At one caller, 100 rather than 25 ms halved audit's CPU per call
# (docs/mcp.md, "Eighth session"); a full batch is fetched again at once.
LIVE_LINGER_S = 0.1

Apply = Callable[[psycopg.AsyncConnection[Any], Delivered], Awaitable[None]]
ApplyBatch = Callable[[psycopg.AsyncConnection[Any], list[Delivered]], Awaitable[None]]


class ProjectionConsumer:
    def __init__(
        self,
        *,
        bus: Bus,
        database_url: str,
        schema: str,
        name: str,
        filter_subject: str,
        apply: Apply | None = None,
        apply_batch: ApplyBatch | None = None,
        batch: int = 256,
        max_deliver: int = 20,
        catch_up_batch: int = 2000,
        prepare: Callable[[Delivered], Any] | None = None,
        ahead: Ahead | None = None,
        worker_from: int = 0,
        history: StoredHistory | None = None,
        linger_s: float = 0.0,
    ) -> None:
        if apply is None and apply_batch is None:
            raise ValueError("a projection needs `apply` or `apply_batch`")
        self.bus, self.database_url, self.schema, self.name = bus, database_url, schema, name
        self.filter_subject, self.batch = filter_subject, batch
        self.apply, self.apply_batch, self.prepare = apply, apply_batch, prepare
        # A catch-up stages its batches ahead of their transactions (services/kit/ahead.py)
        # when the projection can; one at least `worker_from` messages long (if > 0) does
        # it in a worker process.
        self.ahead, self.worker_from = ahead, worker_from
        self.history = history  # where events the stream lost are read back from
        self.restored, self.restored_from = 0, list[str]()  # by the last backfill
        self.max_deliver, self.catch_up_batch = max_deliver, catch_up_batch
        # Live, after a batch that was not full the consumer waits this long before fetching
        # again, so that what arrives meanwhile shares one transaction: at a few calls a
        # second each event would otherwise pay a transaction (~9 round trips) of its own.
        # A quiet projection still applies the first event at once.
        self.linger_s = linger_s
        self.applied = 0
        self._durable_only = False  # set when a catch-up batch failed: redeliveries count then
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

    async def wait_caught_up(self, timeout: float = 3600.0) -> None:
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
            ack_policy=AckPolicy.ALL,  # a batch commits as one: acking its last message acks it
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
                        renewed_at = await self._catch_up(renewed_at)
                        await self._align_consumer()
                        sub = Puller(self.bus.nc, STREAM, self.name)
                        await sub.start()
                    if loop.time() - renewed_at > self._lease.ttl / 3:
                        if not await self._lease.renew():
                            raise RuntimeError("projection lease lost")
                        renewed_at = loop.time()
                    try:
                        msgs = await sub.fetch(self.batch, timeout=1.0)
                    except NatsTimeout:
                        continue
                    await self._handle(msgs)
                    if len(msgs) < self.batch and self.linger_s > 0:
                        await asyncio.sleep(self.linger_s)  # the next fetch takes what came meanwhile
                    backoff = 0.2
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    log.warning("projection %s paused: %r", self.name, err)
                    if sub is not None:
                        with contextlib.suppress(Exception):
                            await sub.stop()
                        sub = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    if "lease lost" in str(err):
                        held = False
        finally:
            if sub is not None:
                with contextlib.suppress(BaseException):
                    await sub.stop()
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
        if msgs:
            await msgs[-1].ack()  # AckPolicy.ALL: one ack for the whole batch

    async def _catch_up(self, renewed_at: float) -> float:
        """Applies what the stream holds beyond the position in large batches (no consumer
        acks: the position commits with each batch); returns when it renewed the lease last.

        Reading and decoding the next batch (and `prepare`) runs while PostgreSQL writes the
        current one.
        """
        if self._durable_only:
            # A batch failed during the last catch-up: let the durable consumer retry it, so
            # that `max_deliver` bounds a poison message as in live operation.
            self._durable_only = False
            return renewed_at
        loop = asyncio.get_running_loop()
        position = await self.position()
        info = await self.bus.js.stream_info(STREAM)
        lost = position < info.state.first_seq - 1 or (position == 0 and info.state.messages > 0)
        if self.history is not None and lost:
            position = await self._backfill(position, info.state.first_seq)
        if info.state.last_seq - position <= self.batch:
            return renewed_at  # close enough: the durable consumer takes it from here
        log.info("projection %s catches up from stream seq %d", self.name, position + 1)
        # Each item: the batch's records and either its decoded messages or its staging.
        Item = tuple[list[Record], list[Delivered] | asyncio.Future[Any]]
        ready: asyncio.Queue[Item | BaseException | None] = asyncio.Queue(maxsize=2)
        stager, worker = None, None
        if self.ahead is not None:
            async with self._conn_lock:
                conn = await self._connection()
                async with conn.transaction():
                    stager = await self.ahead.stager(conn)
            if self.worker_from and info.state.last_seq - position >= self.worker_from:
                worker = StagingWorker(stager)
                log.info("projection %s stages its catch-up in a worker process", self.name)

        async def read() -> None:
            try:
                batches = read_stream(self.bus, self.filter_subject, position + 1, self.catch_up_batch)
                async with contextlib.aclosing(batches):
                    async for records in batches:
                        work: list[Delivered] | asyncio.Future[Any]
                        if worker is not None:  # staged in order: one worker, a FIFO of batches
                            work = worker.stage(records)
                        elif stager is not None:
                            work = loop.create_future()
                            work.set_result(stager.stage(records))
                        else:
                            work = []
                            for start in range(0, len(records), _DECODE_SLICE):
                                work += self._decode(records[start : start + _DECODE_SLICE])
                                await asyncio.sleep(0)  # let the COPY in progress refill its socket
                        await ready.put((records, work))
                await ready.put(None)
            except Exception as err:
                await ready.put(err)

        reader = asyncio.create_task(read(), name=f"projection-{self.name}-read")
        try:
            while not self._stopping:
                got = await ready.get()
                if got is None:
                    break
                if isinstance(got, BaseException):
                    raise got
                records, work = got
                staged = await work if isinstance(work, asyncio.Future) else None
                if loop.time() - renewed_at > self._lease.ttl / 3:
                    if not await self._lease.renew():
                        raise RuntimeError("projection lease lost")
                    renewed_at = loop.time()
                try:
                    if isinstance(work, asyncio.Future):
                        await self._write_staged(records, staged)
                    else:
                        await self._apply_delivered(work, lazy_commit=True)
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    raise  # the database is away: catch up again once it answers
                except Exception:
                    self._durable_only = True
                    raise
                self.applied += len(records)
        finally:
            await stop_task(reader, patience_s=5)
            if worker is not None:
                worker.close()
        return renewed_at

    async def _backfill(self, position: int, first_seq: int) -> int:
        """Applies the events the stream lost (read from the services' stores) before the
        stream's first message; returns the new position (`first_seq - 1` at least).

        They take the sequence numbers just below `first_seq` when they fit in the gap (as in
        the stream they came from, when nothing but relayed events was lost), else numbers
        below zero; either way they are applied before everything the stream still holds.
        """
        assert self.history is not None
        restored, services = await self.history.missing()
        gap = first_seq - 1 - position
        base = first_seq - len(restored) if len(restored) <= gap else -len(restored)
        log.info(
            "projection %s: the stream starts at seq %d; %d events restored from %s",
            self.name,
            first_seq,
            len(restored),
            ", ".join(services) or "no service",
        )
        for start in range(0, max(len(restored), 1), self.catch_up_batch):
            chunk = restored[start : start + self.catch_up_batch]
            records = [Record(base + start + i, r.subject, r.raw, 0) for i, r in enumerate(chunk)]
            last_chunk = start + self.catch_up_batch >= len(restored)
            await self._apply_delivered(
                self._decode(records), at_least=max(position, first_seq - 1) if last_chunk else position
            )
        self.restored, self.restored_from = len(restored), services
        return max(position, first_seq - 1)

    async def _write_staged(self, records: list[Record], staged: Any) -> None:
        """One transaction: a staged batch (catch-up: no WAL flush awaited, see
        `_apply_delivered`), then the new position."""
        assert self.ahead is not None
        async with self._conn_lock:
            conn = await self._connection()
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = off")
                position = await self._read_position(conn)
                if records and records[0].seq <= position:
                    raise RuntimeError(f"projection {self.name}: position {position} moved under a catch-up")
                await self.ahead.write(conn, staged)
                if records:
                    await self._move_position(conn, records[-1].seq)

    async def _move_position(self, conn: psycopg.AsyncConnection[Any], stream_seq: int) -> None:
        await conn.execute(
            SQL(
                "INSERT INTO {} (name, stream_seq) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET stream_seq = EXCLUDED.stream_seq"
            ).format(self._positions),
            [self.name, stream_seq],
        )

    def _decode(self, records: list[Record]) -> list[Delivered]:
        batch = [decode_delivered(r.seq, r.subject, r.data) for r in records]
        if self.prepare is not None:
            for delivered in batch:
                delivered.prepared = self.prepare(delivered)
        return batch

    async def _apply_batch(self, msgs: list[Msg]) -> None:
        records = [Record(seq_of(m), m.subject, m.data, 0) for m in msgs]
        await self._apply_delivered(self._decode(records))

    async def _apply_delivered(
        self, batch: list[Delivered], at_least: int | None = None, lazy_commit: bool = False
    ) -> None:
        """One transaction: the messages beyond the position, then the new position.

        `at_least` (a backfill): apply the whole batch, then move the position there.
        `lazy_commit` (catch-up: nothing is acknowledged to anyone on this commit): do not wait
        for the WAL flush. A crash can then lose the last few batches, but never a batch
        without its position, so they are simply read again from the stream."""
        async with self._conn_lock:
            conn = await self._connection()
            async with conn.transaction():
                if lazy_commit:
                    await conn.execute("SET LOCAL synchronous_commit = off")
                position = await self._read_position(conn)
                start = position
                fresh: list[Delivered] = []
                for delivered in batch:
                    if at_least is None and delivered.stream_seq <= position:
                        continue  # already applied: a redelivery or a replay overlap
                    fresh.append(delivered)
                    position = max(position, delivered.stream_seq)
                if at_least is not None:
                    position = max(position, at_least)
                if self.apply_batch is not None:
                    if fresh:
                        await self.apply_batch(conn, fresh)
                else:
                    assert self.apply is not None
                    for delivered in fresh:
                        await self.apply(conn, delivered)
                if position != start:
                    await self._move_position(conn, position)


async def replay_into(
    bus: Bus,
    database_url: str,
    schema: str,
    filter_subject: str,
    apply_batch: ApplyBatch,
    *,
    until: datetime,
    prepare: Callable[[Delivered], Any] | None = None,
    batch: int = 2000,
) -> int:
    """Applies the stream's messages stored at or before `until` (a prefix of the stream) to
    the projection tables in `schema`, one transaction a batch; returns the last stream seq
    applied. For investigations: a live projection is never touched by this."""
    limit_ns = int(until.timestamp() * 1_000_000_000)
    positions = SQL("{}.projection_positions").format(Identifier(schema))
    last = 0
    async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=5) as conn:
        async with conn.transaction():
            await conn.execute(
                SQL(
                    "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, stream_seq bigint NOT NULL)"
                ).format(positions)
            )
        batches = read_stream(bus, filter_subject, 1, batch)
        async with contextlib.aclosing(batches):
            async for records in batches:
                wanted = list(itertools.takewhile(lambda r: r.time_ns <= limit_ns, records))
                if wanted:
                    delivered = [decode_delivered(r.seq, r.subject, r.data) for r in wanted]
                    if prepare is not None:
                        for d in delivered:
                            d.prepared = prepare(d)
                    async with conn.transaction():
                        await apply_batch(conn, delivered)
                        last = wanted[-1].seq
                        await conn.execute(
                            SQL(
                                "INSERT INTO {} (name, stream_seq) VALUES ('until', %s) "
                                "ON CONFLICT (name) DO UPDATE SET stream_seq = EXCLUDED.stream_seq"
                            ).format(positions),
                            [last],
                        )
                if len(wanted) < len(records):
                    break  # the rest of the stream came later
    return last


async def _cancel_until_done(task: asyncio.Task[None], rounds: int = 50) -> None:
    """Python 3.11's `wait_for` can swallow a cancellation; the task may be inside one (nats-py's
    JetStream and key-value calls, under the lease and the consumer's set-up, use it)."""
    for _ in range(rounds):
        if task.done():
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
