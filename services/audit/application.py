"""The audit trail's use cases: project an event, read a page, digest, verify, rebuild."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

import msgspec
import psycopg

from contracts.commands.audit import AuditFilter, QueryAudit
from services.audit.domain import (
    UNDECODABLE,
    ChainBreak,
    ChainVerifier,
    Digest,
    Entry,
    Head,
    Scope,
    check_page,
    decode_cursor,
    digest_of,
    encode_cursor,
    entry_for,
    instant,
    scope_for,
    seal,
)
from services.kit.projection import Delivered

log = logging.getLogger(__name__)
Conn = psycopg.AsyncConnection[Any]


class TrailStore(Protocol):
    """Where the trail is kept (adapters/store.py); writes join the projection's transaction."""

    async def head(self, conn: Conn, org_id: str) -> Head: ...
    async def append(self, conn: Conn, entry: Entry) -> bool: ...
    async def last_at(self, conn: Conn) -> datetime | None: ...
    async def reset(self, conn: Conn) -> None: ...
    async def page(
        self, scope: Scope, where: AuditFilter, below_seq: int | None, limit: int
    ) -> list[Entry]: ...
    async def summary(self) -> tuple[list[Head], int, int]: ...
    def snapshot(self) -> AbstractAsyncContextManager[tuple[list[Head], AsyncIterator[Entry]]]: ...


class Replayable(Protocol):
    """The projection consumer, as far as a rebuild needs it."""

    async def rebuild(self, reset: Callable[[Conn], Awaitable[None]]) -> None: ...


class Page(msgspec.Struct, frozen=True):
    entries: list[Entry]
    next_cursor: str | None


class Rebuilt(msgspec.Struct, frozen=True):
    before: Digest
    after: Digest
    seconds: float


class Audit:
    def __init__(self, store: TrailStore, cursor_key: bytes) -> None:
        self.store, self.cursor_key = store, cursor_key
        self._rebuilding = asyncio.Lock()

    async def apply(self, conn: Conn, delivered: Delivered) -> None:
        """The ProjectionConsumer's `apply`: one stream message becomes one sealed entry."""
        d = delivered
        previous_at = await self.store.last_at(conn) if d.envelope is None else None
        draft = entry_for(d.stream_seq, d.subject, d.envelope, d.error, previous_at)
        if draft.action == UNDECODABLE:
            log.warning("stream seq %d on %s is undecodable: %s", d.stream_seq, d.subject, d.error)
        entry = seal(draft, await self.store.head(conn, draft.org_id))
        if not await self.store.append(conn, entry):
            log.info("event %s seen again at stream seq %d; kept once", entry.id, entry.stream_seq)

    async def query(self, request: QueryAudit) -> Page:
        """A page of the entries the requester may read; InvalidQuery for a bad limit or cursor."""
        where = msgspec.structs.replace(  # a naive bound means UTC, as on the wire
            request.filter,
            since=instant(request.filter.since) if request.filter.since else None,
            until=instant(request.filter.until) if request.filter.until else None,
        )
        check_page(request.limit, where.since, where.until)
        scope = scope_for(request.org_id, request.user_id, request.is_admin)
        filters: dict[str, Any] = msgspec.to_builtins(where)
        below = None
        if request.cursor:
            below = decode_cursor(request.cursor, scope, filters, self.cursor_key)
        rows = await self.store.page(scope, where, below, request.limit + 1)
        entries = rows[: request.limit]
        more = len(rows) > request.limit
        cursor = encode_cursor(scope, filters, entries[-1].seq, self.cursor_key) if more else None
        return Page(entries, cursor)

    async def digest(self) -> Digest:
        heads, entries, stream_seq = await self.store.summary()
        return digest_of(heads, entries, stream_seq)

    async def verify(self) -> ChainBreak | None:
        """The first broken link of any chain, or None when the whole trail checks out."""
        verifier = ChainVerifier()
        async with self.store.snapshot() as (heads, entries):
            async for entry in entries:
                broken = verifier.check(entry)
                if broken is not None:
                    return broken
            return verifier.finish(heads)

    async def rebuild(self, projection: Replayable) -> Rebuilt:
        """Drops the trail and replays the stream; the digests before and after should match."""
        async with self._rebuilding:
            before = await self.digest()
            started = time.monotonic()
            await projection.rebuild(self.store.reset)
            seconds = time.monotonic() - started
            return Rebuilt(before, await self.digest(), seconds)


__all__ = ["Audit", "Page", "Rebuilt", "Replayable", "TrailStore"]
