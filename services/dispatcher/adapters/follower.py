"""Follows the dispatcher's own event store in order, from a bookmark kept in its schema.

Two followers run: the index of active builds (adapters/index.py) and the slot keeper,
which releases a build's concurrency slot once the build has ended (adapters/slots.py).
Each holds a lease, so one instance at a time applies events; the bookmark advances only
after a batch was handled, so every event is handled at least once (the handlers are
idempotent). The store's notification ids commit in order (a table lock), so a reader
that follows "id > bookmark" never misses one.
"""

import asyncio
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from eventsourcing.application import Application
from psycopg.sql import SQL, Identifier

from services.kit.bus import Bus
from services.kit.eventstore import schema_setup
from services.kit.lease import Lease
from services.kit.tasks import stop_task

log = logging.getLogger(__name__)
BATCH = 200

Event = tuple[int, Any]  # (notification id, domain event)


class Follower:
    def __init__(self, name: str, app: Application[Any], bus: Bus, poll_s: float = 0.5) -> None:
        self.name, self.app, self.bus, self.poll_s = name, app, bus, poll_s
        self.position = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._lease = Lease(bus, f"dispatcher.{name}", holder=str(uuid.uuid4()))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"follower-{name}")
        self.schema: str = self.app.recorder.datastore.schema  # type: ignore[attr-defined]
        self._positions = SQL("{}.follower_positions").format(Identifier(self.schema))

    # -- what a follower does with a batch --------------------------------------------------------
    async def handle(self, events: list[Event], position: int) -> None:
        """Applies the batch and records `position` (override; the default only records it)."""
        await self.in_thread(self.save_position, position)

    def prepare(self) -> None:
        """Creates the follower's tables (runs in the follower's thread before the first read)."""

    # -- the loop ---------------------------------------------------------------------------------
    def nudge(self) -> None:
        """Called from any thread after the application saved new events."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.in_thread(self._create_tables)
        self._task = asyncio.create_task(self._run(), name=f"follower-{self.name}")

    async def stop(self) -> None:
        if self._task:
            await stop_task(self._task)
        await self._lease.release()
        self._executor.shutdown(wait=False)

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._lease.acquire()
                self.position = await self.in_thread(self._read_position)
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("follower %s paused: %s", self.name, err)
                await self._lease.release()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.2

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        while True:
            if loop.time() - renewed_at > self._lease.ttl / 3:
                if not await self._lease.renew():
                    raise RuntimeError("follower lease lost")
                renewed_at = loop.time()
            self._wake.clear()
            batch = await self.in_thread(self._select, self.position)
            if batch:
                await self.handle(batch, batch[-1][0])
                self.position = batch[-1][0]
            if len(batch) < BATCH:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
                except TimeoutError:
                    pass

    def _select(self, position: int) -> list[Event]:
        notifications = self.app.recorder.select_notifications(
            position, BATCH, None, (), inclusive_of_start=False
        )
        return [(n.id, self.app.mapper.to_domain_event(n)) for n in notifications]

    # -- the bookmark -------------------------------------------------------------------------------
    def _create_tables(self) -> None:
        """The bookmark's and the follower's tables, created by one starting instance at a time."""
        datastore: Any = self.app.recorder.datastore  # type: ignore[attr-defined]
        with datastore.get_connection() as conn, schema_setup(conn, self.schema):
            self._create_positions()
            self.prepare()

    def _create_positions(self) -> None:
        with self.app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            conn.execute(
                SQL("CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, position bigint NOT NULL)").format(
                    self._positions
                )
            )

    def _read_position(self) -> int:
        with self.app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            row = conn.execute(
                SQL("SELECT position FROM {} WHERE name = %s").format(self._positions), [self.name]
            ).fetchone()
            return int(row["position"]) if row else 0

    def save_position(self, position: int, cursor: Any = None) -> None:
        statement = SQL(
            "INSERT INTO {} (name, position) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
            "SET position = GREATEST({}.position, EXCLUDED.position)"
        ).format(self._positions, self._positions)
        if cursor is not None:
            cursor.execute(statement, [self.name, position])
            return
        with self.app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            conn.execute(statement, [self.name, position])
