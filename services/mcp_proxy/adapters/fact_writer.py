"""Saves the recorder's batches (tool calls, upstream processes and requests) on the event loop.

eventsourcing's `save` is synchronous: run in a worker thread it cost ~55 µs of CPU per fact
here (its recorder's bookkeeping, per-row parameter adaptation, the thread hand-off), about
twice this writer's ~25 µs (the events still come from the aggregates and the store's
mapper). The batch is one INSERT into the store's own table, so the outbox relay and every
reader see the same rows as before. It takes the table lock eventsourcing takes for every
save: catalog changes are still saved by eventsourcing, and notification ids must commit in
order, or the relay could pass one that commits later. The committed rows go to the outbox
relay with their events (`on_rows`), so it need not read them back.
"""

from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from eventsourcing.domain import DomainEvent
from psycopg.sql import SQL, Identifier

from services.kit.eventstore import array_literals, insert_stored_events, notifications
from services.kit.outbox import Fed
from services.mcp_proxy.application.store import ProxyStore


class FactWriter:
    def __init__(
        self, store: ProxyStore, database_url: str, on_rows: Callable[[list[Fed]], None] | None = None
    ) -> None:
        self.store, self.database_url = store, database_url
        self.on_rows = on_rows
        recorder: Any = store.recorder
        schema, table = recorder.datastore.schema, recorder.events_table_name
        self._lock = SQL("LOCK TABLE {}.{} IN EXCLUSIVE MODE").format(Identifier(schema), Identifier(table))
        self._insert = insert_stored_events(schema, table)
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def write(self, events: Sequence[DomainEvent]) -> None:
        """Saves `events` in one transaction, then hands the rows to the outbox relay (or
        nudges it to read them)."""
        stored = [self.store.mapper.to_stored_event(e) for e in events]
        params = array_literals(stored)
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(self.database_url, connect_timeout=5)
            async with self._conn.transaction():
                await self._conn.execute(self._lock)
                cur = await self._conn.execute(self._insert, params, prepare=True)
                rows = await cur.fetchall()
        except BaseException:
            if self._conn is not None:  # its state is unknown now: start afresh next time
                conn, self._conn = self._conn, None
                await conn.close()
            raise
        if self.on_rows is None:
            self.store.on_saved()
        else:
            self.on_rows(notifications(stored, rows, events))

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
