"""The caller's call history (a projection of ToolCallCompleted), its digest, and its rebuild."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import psycopg

from contracts.commands.audit import ProjectionDigest, RebuildReport
from contracts.commands.mcp import History, HistoryItem, HistoryPage
from services.mcp_proxy.domain.history import Digest, check_limit, decode_cursor, encode_cursor

Conn = psycopg.AsyncConnection[Any]


class HistoryTable(Protocol):
    async def page(
        self, user_id: str, server: str | None, below: int | None, limit: int
    ) -> list[tuple[Any, ...]]: ...
    async def digest(self) -> tuple[Digest, int]: ...
    async def reset(self, conn: Conn) -> None: ...


class Replayable(Protocol):
    async def rebuild(self, reset: Callable[[Conn], Awaitable[None]]) -> None: ...


def item(row: tuple[Any, ...]) -> HistoryItem:
    return HistoryItem(
        request_id=row[4],
        server=row[5],
        tool_name=row[6],
        status=row[7],
        duration_ms=row[8],
        arguments_sha256=row[9],
        arguments_bytes=row[10],
        result_bytes=row[11],
        error=row[13],
        timestamp=row[14],
    )


class CallHistory:
    def __init__(self, table: HistoryTable, projection: Replayable, cursor_key: bytes) -> None:
        self.table, self.projection, self.cursor_key = table, projection, cursor_key
        self._rebuilding = asyncio.Lock()

    async def page(self, q: History) -> HistoryPage:
        """Invalid for a bad limit or cursor."""
        check_limit(q.limit)
        user = q.caller.user_id
        below = decode_cursor(q.cursor, user, q.server, self.cursor_key) if q.cursor else None
        rows = await self.table.page(user, q.server, below, q.limit + 1)
        items = rows[: q.limit]
        more = len(rows) > q.limit
        cursor = encode_cursor(user, q.server, items[-1][1], self.cursor_key) if more else None
        return HistoryPage([item(r) for r in items], cursor)

    async def digest(self) -> ProjectionDigest:
        digest, top = await self.table.digest()
        return ProjectionDigest(
            entries=digest.rows, orgs=len(digest.orgs), digest=digest.hexdigest(), stream_seq=top
        )

    async def rebuild(self) -> RebuildReport:
        """Drops the history and replays it from the stream; the digests should match."""
        async with self._rebuilding:
            before = await self.digest()
            started = time.monotonic()
            await self.projection.rebuild(self.table.reset)
            seconds = time.monotonic() - started
            return RebuildReport(before=before, after=await self.digest(), seconds=seconds)
