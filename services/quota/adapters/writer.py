"""Group commit: the ledger's facts reach PostgreSQL in batches, before anyone is answered.

Callers submit the facts of a decision and await the batch they joined. One batch is
written at a time; whatever is submitted meanwhile forms the next one, so batches grow
with load (no timer: an idle writer writes a lone fact at once). A written batch is one
INSERT (one transaction, one fsync) of all its facts plus the writer's seal, whose rows go
to the outbox relay with their events (`on_rows`), so it need not read them back.

The rows are eventsourcing's stored events (its mapper encodes them; its recorder reads
them back at load, and for the outbox relay when it was not fed), written with one asynchronous psycopg
statement on the event loop: the library's own insert is synchronous and, run in a worker
thread, cost about half of the service's CPU here in thread hand-offs and parameter
dumping. The table lock eventsourcing takes to keep notification ids in commit order is
not needed: batches are written one at a time and the seal serialises writers.

When a batch fails, nothing of it or of what queued behind it was recorded, but the
in-memory ledger already holds those facts: every waiter gets WriteFailed, the writer
refuses work until `reset`, and `on_failure` tells the leader to reload the ledger from
the store.
"""

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from eventsourcing.domain import DomainEvent

from services.kit.eventstore import array_literals, insert_stored_events, notifications
from services.kit.outbox import Fed
from services.kit.tasks import stop_task
from services.quota.adapters.store import QuotaStore, recordable
from services.quota.application import Entry, WriteFailed

log = logging.getLogger(__name__)


class _Group:
    __slots__ = ("entries", "future")

    def __init__(self, entries: list[Entry], future: asyncio.Future[int] | None) -> None:
        self.entries, self.future = entries, future


class GroupWriter:
    def __init__(
        self,
        store: QuotaStore,
        database_url: str,
        holder: str,
        on_written: Callable[[], None] = lambda: None,
        on_failure: Callable[[BaseException], None] = lambda _: None,
        on_rows: Callable[[list[Fed]], None] = lambda _: None,
        max_events: int = 1000,
    ) -> None:
        self.store, self.database_url, self.holder, self.max_events = store, database_url, holder, max_events
        self.on_written, self.on_failure, self.on_rows = on_written, on_failure, on_rows
        self.fence = 0  # the writer seal's last version
        self.position = 0  # last notification id written
        self.batches = 0
        self.events = 0
        self._queue: deque[_Group] = deque()
        self._wake = asyncio.Event()
        self._busy = False
        self._broken: BaseException | None = WriteFailed("the ledger is not loaded yet")
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        recorder: Any = store.recorder
        self._insert = insert_stored_events(recorder.datastore.schema, recorder.events_table_name)

    # -- lifecycle ---------------------------------------------------------------------
    def reset(self, fence: int, position: int) -> None:
        """After a (re)load: the store's seal version and last notification id."""
        self.fence, self.position, self._broken = fence, position, None

    def halt(self, reason: str) -> None:
        self._fail(WriteFailed(reason))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="quota-writer")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        self._fail(WriteFailed("the quota writer stopped"))
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # -- the journal the application writes to --------------------------------------------
    def submit(self, entries: list[Entry]) -> asyncio.Future[int]:
        """A future resolved (with the batch's last notification id) once `entries` are recorded."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._broken is not None:
            future.set_exception(WriteFailed(str(self._broken)))
            return future
        self._queue.append(_Group(entries, future))
        self._wake.set()
        return future

    def post(self, entries: list[Entry]) -> None:
        """Records without waiting (expiries, refusals); a failure still triggers a reload."""
        if self._broken is None and entries:
            self._queue.append(_Group(entries, None))
            self._wake.set()

    def barrier(self) -> asyncio.Future[int]:
        """Resolved once everything submitted so far is recorded."""
        if not self._busy and not self._queue and self._broken is None:
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            done.set_result(self.position)
            return done
        return self.submit([])

    # -- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                groups = self._take()
                events = [e for g in groups for e in g.entries]
                if not events:
                    self._resolve(groups, self.position)
                    continue
                self._busy = True
                try:
                    position = await self._write(events, self.fence + 1)
                except Exception as err:
                    log.error("quota batch of %d facts not recorded: %r", len(events), err)
                    reason = f"the ledger could not be recorded ({type(err).__name__})"
                    self._fail(WriteFailed(reason), groups)
                    self.on_failure(err)
                    continue
                finally:
                    self._busy = False
                self.fence += 1
                self.position = position
                self.batches += 1
                self.events += len(events)
                self._resolve(groups, position)
                self.on_written()

    def _take(self) -> list[_Group]:
        groups: list[_Group] = []
        size = 0
        while self._queue and (not groups or size + len(self._queue[0].entries) <= self.max_events):
            group = self._queue.popleft()
            groups.append(group)
            size += len(group.entries)
        return groups

    async def _write(self, entries: list[Entry], version: int) -> int:
        """The seal first, then the facts, in one statement; returns the last notification id."""
        events: list[DomainEvent] = [self.store.seal(version, self.holder, len(entries), datetime.now(UTC))]
        events.extend(recordable(fact, reservation, meta) for fact, reservation, meta in entries)
        stored = [self.store.mapper.to_stored_event(e) for e in events]
        params = array_literals(stored)
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.database_url, autocommit=True, connect_timeout=5
                )
            cur = await self._conn.execute(self._insert, params, prepare=True)
            rows = await cur.fetchall()
        except BaseException:
            if self._conn is not None:  # its state is unknown now: start afresh next time
                conn, self._conn = self._conn, None
                await conn.close()
            raise
        self.on_rows(notifications(stored, rows, events))
        return max(int(row[0]) for row in rows)

    @staticmethod
    def _resolve(groups: list[_Group], position: int) -> None:
        for group in groups:
            if group.future is not None and not group.future.done():
                group.future.set_result(position)

    def _fail(self, err: BaseException, groups: list[_Group] | None = None) -> None:
        self._broken = err
        failed = [*(groups or []), *self._queue]
        self._queue.clear()
        for group in failed:
            if group.future is not None and not group.future.done():
                group.future.set_exception(WriteFailed(str(err)))
                group.future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
