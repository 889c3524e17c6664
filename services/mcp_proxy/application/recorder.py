"""Saves call and process facts off the response path, many per transaction.

eventsourcing commits about a thousand single-event transactions a second here, far below
the call rate a gateway must sustain, so the hot path only appends a small record and
replies; this recorder turns what accumulated every `interval` (or as soon as `batch`
records wait) into the aggregates' events and hands them to `write` (adapters/fact_writer.py:
one transaction on the event loop), and the outbox relay publishes them from the store.

The trade-off: a crash loses the records of the last few milliseconds (the calls were
answered, their events never recorded). Quota is not affected in a way users could
exploit: the quota service charges from its own reservation and ledger (issue 5), and a
call refused by the gate never reaches an upstream. While PostgreSQL is away, records wait
in memory (up to `max_queue`, oldest dropped beyond it, with an error in the log).
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from eventsourcing.domain import DomainEvent

from contracts.commands.common import CommandMeta
from services.kit.tasks import stop_task
from services.mcp_proxy.domain.calls import CallRecord, ProcessRecord, ToolCall, UpstreamProcess
from services.mcp_proxy.domain.requests import RequestRecord, UpstreamRequest

log = logging.getLogger(__name__)


def event_meta(meta: CommandMeta) -> dict[str, Any]:
    """The envelope metadata a recorded fact carries: who asked, the correlation, the trace."""
    out: dict[str, Any] = {"actor": meta.actor, "correlation_id": meta.correlation_id}
    if meta.trace.traceparent:
        out["trace"] = meta.trace
    return msgspec.to_builtins(out)  # type: ignore[no-any-return]


Record = CallRecord | ProcessRecord | RequestRecord
Write = Callable[[Sequence[DomainEvent]], Awaitable[None]]


class Recorder:
    def __init__(self, write: Write, batch: int, interval_s: float, max_queue: int = 200_000) -> None:
        self.write, self.batch, self.interval_s, self.max_queue = write, batch, interval_s, max_queue
        self.saved = 0
        self.dropped = 0
        self._queue: deque[Record] = deque()
        self._wake = asyncio.Event()
        self._started: dict[str, ProcessRecord] = {}  # Started saved, Stopped not yet
        self._task: asyncio.Task[None] | None = None

    # -- the hot path's side ---------------------------------------------------------------
    def call(self, record: CallRecord) -> None:
        self._add(record)

    def process(self, record: ProcessRecord) -> None:
        self._add(record)

    def request(self, record: RequestRecord) -> None:
        self._add(record)

    def _add(self, record: Record) -> None:
        queue = self._queue
        queue.append(record)
        if len(queue) > self.max_queue:
            queue.popleft()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("call records are being dropped: the event store is not keeping up")
        if not self._wake.is_set():
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mcp-recorder")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        with contextlib.suppress(Exception):
            while self._queue:  # a last flush; PostgreSQL away means these are lost
                await self._flush()

    _busy = False

    async def flushed(self, timeout: float = 10.0) -> None:
        """Waits until every record added so far is saved (tests, benches)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._queue or self._busy:
            if loop.time() > deadline:
                raise TimeoutError("the recorder did not flush in time")
            await asyncio.sleep(0.01)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self._queue) < self.batch:
                await asyncio.sleep(self.interval_s)
            while self._queue:
                try:
                    await self._flush()
                    backoff = 0.2
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    log.warning("saving %d call records failed, retrying: %s", len(self._queue), err)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)

    async def _flush(self) -> None:
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(len(queue), self.batch))]
        self._busy = True
        try:
            events = self._events(batch)
            if events:
                await self.write(events)
        except BaseException:
            queue.extendleft(reversed(batch))  # kept, in order, for the next attempt
            raise
        finally:
            self._busy = False
        self._remember(batch)
        self.saved += len(batch)

    def _events(self, batch: list[Record]) -> list[DomainEvent]:
        """The batch's facts as the events of their aggregates (changes nothing here)."""
        events: list[Any] = []
        processes: dict[str, UpstreamProcess] = {}
        for record in batch:
            if isinstance(record, CallRecord):
                events.append(ToolCall.completed(record))
            elif isinstance(record, RequestRecord):
                events.extend(UpstreamRequest.of(record).collect_events())
            elif record.reason is None:
                processes[record.token] = UpstreamProcess.of(record)
            else:
                agg = processes.get(record.token)
                if agg is None:
                    started = self._started.get(record.token)
                    if started is None:
                        continue
                    agg = UpstreamProcess.of(started)
                    agg.collect_events()  # its Started event is already saved
                    processes[record.token] = agg
                agg.stop(record.reason)
        events.extend(e for agg in processes.values() for e in agg.collect_events())
        return events

    def _remember(self, batch: list[Record]) -> None:
        """Which processes have a saved Started and no Stopped yet (their stop needs it)."""
        for record in batch:
            if isinstance(record, ProcessRecord):
                if record.reason is None:
                    self._started[record.token] = record
                else:
                    self._started.pop(record.token, None)
