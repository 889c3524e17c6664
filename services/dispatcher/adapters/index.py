"""The index of active builds (queued or running), for `GET /v1/sessions` and the reaper.

A table in the dispatcher's schema, kept by a follower of its event store: a build enters
when queued, gains its node when started and its pid when its worker is attached, and
leaves when it ends. Rows and bookmark change in one transaction, so the index is exact
(and only as far behind the store as the follower is). It holds only active builds, so it
stays as small as the platform's concurrency.
"""

import asyncio
from typing import Any

import msgspec
from psycopg.sql import SQL, Identifier

from services.dispatcher.adapters.follower import Event, Follower
from services.dispatcher.application.ports import ActiveBuild


class ActiveIndex(Follower):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("active_builds", *args, **kwargs)
        self._table = SQL("{}.active_builds").format(Identifier(self.schema))

    def prepare(self) -> None:
        with self.app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            conn.execute(
                SQL(
                    "CREATE TABLE IF NOT EXISTS {} (build_id uuid PRIMARY KEY, user_id text NOT NULL, "
                    "org_id text NOT NULL, status text NOT NULL, node text, pid integer, "
                    "queued_at timestamptz NOT NULL, started_at timestamptz)"
                ).format(self._table)
            )
            conn.execute(
                SQL("CREATE INDEX IF NOT EXISTS active_builds_user ON {} (user_id)").format(self._table)
            )

    async def handle(self, events: list[Event], position: int) -> None:
        await self.in_thread(self._apply, events, position)

    def _apply(self, events: list[Event], position: int) -> None:
        with self.app.recorder.datastore.transaction(commit=True) as cur:  # type: ignore[attr-defined]
            for _, e in events:
                self._apply_one(cur, type(e).__qualname__, e)
            self.save_position(position, cur)

    def _apply_one(self, cur: Any, kind: str, e: Any) -> None:
        oid = e.originator_id
        if kind == "Build.Queued":
            cur.execute(
                SQL(
                    "INSERT INTO {} (build_id, user_id, org_id, status, queued_at) "
                    "VALUES (%s, %s, %s, 'queued', %s) ON CONFLICT (build_id) DO NOTHING"
                ).format(self._table),
                [oid, e.user_id, e.org_id, e.queued_at],
            )
        elif kind == "Build.Started":
            cur.execute(
                SQL(
                    "UPDATE {} SET status = 'running', node = %s, started_at = %s WHERE build_id = %s"
                ).format(self._table),
                [e.node, e.started_at, oid],
            )
        elif kind == "Build.Attached":
            cur.execute(SQL("UPDATE {} SET pid = %s WHERE build_id = %s").format(self._table), [e.pid, oid])
        elif kind == "Build.Finished":
            cur.execute(SQL("DELETE FROM {} WHERE build_id = %s").format(self._table), [oid])

    # -- reads (any instance) -------------------------------------------------------------------
    def _rows(self, user_id: str | None) -> list[ActiveBuild]:
        select = SQL(
            "SELECT build_id::text AS build_id, user_id, status, node, pid, queued_at, started_at FROM {} "
        ).format(self._table)
        if user_id is None:
            query, args = select + SQL("ORDER BY queued_at"), []
        else:
            query = select + SQL("WHERE user_id = %s AND status = 'running' ORDER BY queued_at")
            args = [user_id]
        with self.app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            rows = conn.execute(query, args).fetchall()
        return [msgspec.convert(dict(r), ActiveBuild) for r in rows]

    async def running(self, user_id: str) -> list[ActiveBuild]:
        return await asyncio.to_thread(self._rows, user_id)

    async def active(self) -> list[ActiveBuild]:
        return await asyncio.to_thread(self._rows, None)
