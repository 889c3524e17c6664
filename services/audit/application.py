"""The audit trail's use cases: project an event, read a page, digest, verify, rebuild."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
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
    advance,
    check_page,
    decode_cursor,
    digest_of,
    encode_cursor,
    entry_for,
    genesis,
    instant,
    scope_for,
    seal,
)
from services.kit.projection import Delivered, decode_delivered
from services.kit.stream_reader import Record

log = logging.getLogger(__name__)
Conn = psycopg.AsyncConnection[Any]


class TrailStore(Protocol):
    """Where the trail is kept (adapters/store.py); writes join the projection's transaction."""

    async def heads(self, conn: Conn, org_ids: Iterable[str]) -> dict[str, Head]: ...
    async def all_heads(self, conn: Conn) -> list[Head]: ...
    @staticmethod
    def encode_rows(entries: list[Entry]) -> bytes: ...  # module-level: picklable
    async def copy_rows(self, conn: Conn, rows: bytes) -> None: ...
    async def known(self, conn: Conn, ids: Sequence[str]) -> set[str]: ...
    async def write_entries(self, conn: Conn, entries: Iterable[Entry]) -> None: ...
    async def move_heads(self, conn: Conn, heads: Sequence[Head]) -> None: ...
    async def last_at(self, conn: Conn) -> datetime | None: ...
    async def reset(self, conn: Conn) -> None: ...
    async def rebuilt(self) -> None: ...
    async def page(
        self, scope: Scope, where: AuditFilter, below_seq: int | None, limit: int
    ) -> list[Entry]: ...
    async def summary(self) -> tuple[list[Head], int, int]: ...
    def snapshot(self) -> AbstractAsyncContextManager[tuple[list[Head], AsyncIterator[Entry]]]: ...


class Replayable(Protocol):
    """The projection consumer, as far as a rebuild needs it."""

    restored: int  # events the last rebuild read back from the services' stores
    restored_from: list[str]

    async def rebuild(self, reset: Callable[[Conn], Awaitable[None]]) -> None: ...


class ScratchReplay(Protocol):
    """Rebuilds the trail as it stood at a moment somewhere else; returns (where, its digest)."""

    async def __call__(self, until: datetime) -> tuple[str, Digest]: ...


class Page(msgspec.Struct, frozen=True):
    entries: list[Entry]
    next_cursor: str | None


class Rebuilt(msgspec.Struct, frozen=True):
    before: Digest
    after: Digest
    seconds: float
    restored: int = 0
    restored_from: tuple[str, ...] = ()


class Investigation(msgspec.Struct, frozen=True):
    schema: str
    digest: Digest
    seconds: float


def _draft(d: Delivered) -> Entry:
    return d.prepared if isinstance(d.prepared, Entry) else prepared_entry(d)


def seal_batch(
    batch: list[Delivered],
    drafts: list[Entry],
    heads: dict[str, Head],
    seen: set[str],
    previous_at: datetime | None,
) -> tuple[list[Entry], datetime | None]:
    """Seals each new draft into its org's chain, advancing `heads` and `seen` in place;
    returns the sealed entries and the time the next undated message takes."""
    sealed: list[Entry] = []
    for d, draft in zip(batch, drafts, strict=True):
        if d.envelope is None:  # dated by the newest entry before it
            draft = entry_for(d.stream_seq, d.subject, None, d.error, previous_at)
        if draft.action == UNDECODABLE:
            log.warning("stream seq %d on %s is undecodable: %s", d.stream_seq, d.subject, d.error)
        if draft.id in seen:
            log.info("event %s seen again at stream seq %d; kept once", draft.id, d.stream_seq)
            continue
        seen.add(draft.id)
        head = heads.get(draft.org_id) or genesis(draft.org_id)
        entry = seal(draft, head)
        heads[head.org_id] = advance(head, entry)
        previous_at = entry.at
        sealed.append(entry)
    return sealed, previous_at


class StagedRows(msgspec.Struct):
    rows: bytes  # the sealed entries, as `TrailStore.encode_rows` makes them for a COPY
    heads: list[Head]  # the heads the entries moved, in org order


class ChainStager:
    """Seals a catch-up's batches ahead of their transactions (services/kit/ahead.py), from
    chain heads kept in memory; pure and picklable, so it can run in a worker process."""

    def __init__(
        self, heads: dict[str, Head], previous_at: datetime | None, encode: Callable[[list[Entry]], bytes]
    ) -> None:
        self.heads, self.previous_at, self.encode = heads, previous_at, encode

    def stage(self, records: list[Record]) -> StagedRows:
        batch = [decode_delivered(r.seq, r.subject, r.data) for r in records]
        drafts = [prepared_entry(d) for d in batch]
        # Ids already in the trail are not looked up: one breaks the COPY on the primary key,
        # and the durable consumer, which looks them up, takes over from there.
        sealed, self.previous_at = seal_batch(batch, drafts, self.heads, set(), self.previous_at)
        moved = sorted({entry.org_id for entry in sealed})
        return StagedRows(self.encode(sealed), [self.heads[org_id] for org_id in moved])


class ChainsAhead:
    """The trail as the ProjectionConsumer's `ahead`: a catch-up's transaction per batch is
    one COPY of rows sealed beforehand and one upsert of the heads they moved."""

    def __init__(self, store: TrailStore) -> None:
        self.store = store

    async def stager(self, conn: Conn) -> ChainStager:
        heads = {head.org_id: head for head in await self.store.all_heads(conn)}
        return ChainStager(heads, await self.store.last_at(conn), self.store.encode_rows)

    async def write(self, conn: Conn, staged: StagedRows) -> None:
        await self.store.copy_rows(conn, staged.rows)
        await self.store.move_heads(conn, staged.heads)


def prepared_entry(d: Delivered) -> Entry:
    """The entry a message makes, before it is chained (pure: runs ahead of the transaction,
    in a worker process during a long catch-up)."""
    return entry_for(d.stream_seq, d.subject, d.envelope, d.error, raw=d.raw)


class Audit:
    def __init__(self, store: TrailStore, cursor_key: bytes, scratch: ScratchReplay | None = None) -> None:
        self.store, self.cursor_key, self.scratch = store, cursor_key, scratch
        self._rebuilding = asyncio.Lock()

    async def apply(self, conn: Conn, delivered: Delivered) -> None:
        """One stream message becomes one sealed entry."""
        await self.apply_batch(conn, [delivered])

    def prepare(self, d: Delivered) -> Entry:
        return prepared_entry(d)

    async def apply_batch(self, conn: Conn, batch: list[Delivered]) -> None:
        """The ProjectionConsumer's `apply_batch`: each message becomes one sealed entry, in order.

        Chains advance in memory and the batch is written at once, so the result is the same
        as applying the messages one by one, whatever the batch boundaries (a rebuild cuts
        the stream differently from live operation and must give the same trail).
        """
        drafts = [_draft(d) for d in batch]
        heads = await self.store.heads(conn, {draft.org_id for draft in drafts})
        seen = await self.store.known(conn, [draft.id for draft in drafts])
        previous_at = await self.store.last_at(conn) if any(d.envelope is None for d in batch) else None
        sealed, _ = seal_batch(batch, drafts, heads, seen, previous_at)
        # Sealed first, then one COPY (feeding the COPY while sealing gained nothing measurable).
        if sealed:
            await self.store.write_entries(conn, sealed)
        moved = {entry.org_id for entry in sealed}
        await self.store.move_heads(conn, [heads[org_id] for org_id in sorted(moved)])

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
            replayed = time.monotonic()
            await self.store.rebuilt()  # read indexes and statistics
            seconds = time.monotonic() - started
            log.warning(  # an operator's action: worth a line at the default level
                "audit rebuilt: replay %.1f s, read indexes and statistics %.1f s",
                replayed - started,
                seconds - (replayed - started),
            )
            after = await self.digest()
            return Rebuilt(before, after, seconds, projection.restored, tuple(projection.restored_from))

    async def rebuild_until(self, until: datetime) -> Investigation:
        """The trail as it stood at `until` (a naive time is UTC), beside the live one."""
        if self.scratch is None:
            raise RuntimeError("this audit instance cannot rebuild past states")
        started = time.monotonic()
        schema, digest = await self.scratch(instant(until))
        return Investigation(schema, digest, time.monotonic() - started)


__all__ = [
    "Audit",
    "ChainsAhead",
    "Investigation",
    "Page",
    "Rebuilt",
    "Replayable",
    "ScratchReplay",
    "TrailStore",
    "prepared_entry",
]
