"""The trail in PostgreSQL, schema `audit`: entries, and the head of each org's chain.

Writes run on the projection consumer's connection, inside its transaction, so an entry,
its chain head and the stream position commit together. Reads use a pool of their own.
A batch is written with a handful of statements whatever its size (`heads`, `known`,
`write_entries`: one COPY; `move_heads`: one multi-row upsert).
"""

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from psycopg.sql import SQL, Composable, Composed, Identifier
from psycopg.types.json import set_json_dumps
from psycopg_pool import AsyncConnectionPool

from contracts.commands.audit import AuditFilter
from contracts.envelope import Actor
from services.audit.adapters.schema import (
    READ_INDEXES,
    create_read_indexes,
    create_tables,
    drop_read_indexes,
)
from services.audit.domain import Entry, Head, Scope, genesis

Conn = psycopg.AsyncConnection[Any]
_COLUMNS = (
    "id, org_id, seq, stream_seq, at, actor_kind, actor_id, actor_key_id, actor_ip, "
    "actor_user_agent, subject_user_id, action, resource_type, resource_id, outcome, metadata, "
    "correlation_id, trace_id, prev_hash, hash"
)
_encoder = msgspec.json.Encoder()
_TYPES = ["text", "text", "int8", "int8", "timestamptz", *["text"] * 10, "jsonb", *["text"] * 4]


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def encode_copy_rows(entries: list[Entry]) -> bytes:
    """Entries as COPY text rows of `_COLUMNS`, made where the sealing runs (a worker process
    in a long catch-up). Texts never hold NUL (`clean_text` replaces it, JSON escapes it), so
    NUL stands for NULL while a row is joined; a row with a tab, newline or backslash in a
    value (JSON with an escaped quote, say) is escaped value by value instead."""
    lines: list[str] = []
    for e in entries:
        a = e.actor
        values = (
            e.id,
            e.org_id,
            str(e.seq),
            str(e.stream_seq),
            e.at.isoformat(),
            a.kind,
            a.id,
            a.key_id,
            a.ip,
            a.user_agent,
            e.subject_user_id,
            e.action,
            e.resource_type,
            e.resource_id,
            e.outcome,
            _encoder.encode(e.metadata).decode(),
            e.correlation_id,
            e.trace_id,
            e.prev_hash,
            e.hash,
        )
        line = "\t".join(["\x00" if v is None else v for v in values])
        if "\\" in line or "\n" in line or "\r" in line or line.count("\t") != len(values) - 1:
            line = "\t".join(["\\N" if v is None else v.translate(_ESCAPES) for v in values])
        else:
            line = line.replace("\x00", "\\N")
        lines.append(line)
    lines.append("")
    return "\n".join(lines).encode()


class AuditStore:
    def __init__(self, database_url: str, schema: str = "audit", pool_size: int = 8) -> None:
        self.database_url, self.schema, self.pool_size = database_url, schema, pool_size
        self._pool: AsyncConnectionPool[Conn] | None = None

    def _sql(self, text: str, **parts: Composable) -> Composed:
        return SQL(text).format(s=Identifier(self.schema), cols=SQL(_COLUMNS), **parts)

    # -- lifecycle (a host component) -----------------------------------------------------
    async def start(self) -> None:
        connect = psycopg.AsyncConnection.connect(self.database_url, connect_timeout=5)
        async with await connect as conn:
            await create_tables(conn, self.schema)
        self._pool = AsyncConnectionPool(
            self.database_url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            kwargs={"connect_timeout": 5},
        )
        await self._pool.open(wait=True, timeout=10)

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise RuntimeError("the audit store is not started")
        return self._pool

    # -- writes, on the projection's connection -------------------------------------------
    async def heads(self, conn: Conn, org_ids: Iterable[str]) -> dict[str, Head]:
        """The heads of these chains, locked until the transaction ends (genesis if new)."""
        wanted = sorted(set(org_ids))  # a fixed lock order
        cur = await conn.execute(
            self._sql(
                "SELECT org_id, seq, hash FROM {s}.chain_heads WHERE org_id = ANY(%s) "
                "ORDER BY org_id FOR UPDATE"
            ),
            [wanted],
        )
        found = {str(r[0]): Head(str(r[0]), int(r[1]), str(r[2])) for r in await cur.fetchall()}
        return {org_id: found.get(org_id) or genesis(org_id) for org_id in wanted}

    async def all_heads(self, conn: Conn) -> list[Head]:
        """Every chain's head (a catch-up keeps them in memory under the projection's lease)."""
        cur = await conn.execute(self._sql("SELECT org_id, seq, hash FROM {s}.chain_heads"))
        return [Head(str(r[0]), int(r[1]), str(r[2])) for r in await cur.fetchall()]

    async def known(self, conn: Conn, ids: Sequence[str]) -> set[str]:
        """Which of these entry ids the trail already holds."""
        if not ids:
            return set()
        # Never a prepared statement: its generic plan, made while the trail was small, was a
        # sequential scan, kept as the trail grew (every batch then read the whole table).
        joined = "\n".join(ids)  # one text parameter: a list of 2,000 is slow to adapt
        if joined.count("\n") == len(ids) - 1:
            query = "SELECT id FROM {s}.entries WHERE id = ANY(string_to_array(%s, E'\\n'))"
            cur = await conn.execute(self._sql(query), [joined], prepare=False)
        else:  # an id holds a newline
            query = "SELECT id FROM {s}.entries WHERE id = ANY(%s)"
            cur = await conn.execute(self._sql(query), [list(ids)], prepare=False)
        return {str(r[0]) for r in await cur.fetchall()}

    async def write_entries(self, conn: Conn, entries: Iterable[Entry]) -> None:
        """COPYs sealed entries (new ids, in chain order)."""
        async with conn.cursor() as cur:
            set_json_dumps(_encoder.encode, cur)  # metadata: bytes straight from msgspec
            statement = self._sql("COPY {s}.entries ({cols}) FROM STDIN (FORMAT BINARY)")
            async with cur.copy(statement) as copy:
                copy.set_types(_TYPES)
                for entry in entries:
                    await copy.write_row(_row(entry))

    @staticmethod
    def encode_rows(entries: list[Entry]) -> bytes:
        """`encode_copy_rows` (a static method pickles by name: a worker process runs it)."""
        return encode_copy_rows(entries)

    async def copy_rows(self, conn: Conn, rows: bytes) -> None:
        """COPYs rows `encode_rows` made (in chain order, new ids)."""
        if rows:
            async with conn.cursor() as cur:
                async with cur.copy(self._sql("COPY {s}.entries ({cols}) FROM STDIN")) as copy:
                    await copy.write(rows)

    async def move_heads(self, conn: Conn, heads: Sequence[Head]) -> None:
        if heads:
            await conn.execute(
                self._sql(
                    "INSERT INTO {s}.chain_heads (org_id, seq, hash) "
                    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[]) "
                    "ON CONFLICT (org_id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash"
                ),
                [[h.org_id for h in heads], [h.seq for h in heads], [h.hash for h in heads]],
            )

    async def last_at(self, conn: Conn) -> datetime | None:
        """When the newest entry happened: the best date for a message with none of its own."""
        cur = await conn.execute(self._sql("SELECT at FROM {s}.entries ORDER BY stream_seq DESC LIMIT 1"))
        row = await cur.fetchone()
        return _utc(row[0]) if row else None

    async def reset(self, conn: Conn) -> None:
        """Empties the trail for a rebuild; the read indexes go too, until `rebuilt`."""
        await conn.execute(self._sql("TRUNCATE {s}.entries, {s}.chain_heads"))
        await drop_read_indexes(conn, self.schema)

    async def rebuilt(self) -> None:
        """After a rebuild: the read indexes again (sorted in bulk), and fresh statistics."""

        async def build(names: list[str]) -> None:
            async with self.pool.connection() as conn:
                await conn.execute("SET maintenance_work_mem = '256MB'")
                await conn.execute("SET max_parallel_maintenance_workers = 0")
                await create_read_indexes(conn, self.schema, names)
                await conn.execute("RESET ALL")

        # Three connections, two indexes each, one sort per connection: at 200,000 entries on
        # this 2-core machine 1.7 s, against 2.3 s one after the other with PostgreSQL's own
        # parallel workers (bench/audit_replay.py, docs/replay.md).
        names = list(READ_INDEXES)
        await asyncio.gather(*(build(names[i::3]) for i in range(3)))
        async with self.pool.connection() as conn:
            await conn.execute(self._sql("ANALYZE {s}.entries, {s}.chain_heads"))

    # -- reads, on the pool ---------------------------------------------------------------
    async def page(self, scope: Scope, where: AuditFilter, below_seq: int | None, limit: int) -> list[Entry]:
        """Entries of `scope` matching `where`, newest (highest seq) first."""
        clauses: list[Composable] = [SQL("org_id = %s")]
        params: list[Any] = [scope.org_id]
        if scope.user_id is not None:
            clauses.append(SQL("(actor_id = %s OR subject_user_id = %s)"))
            params += [scope.user_id, scope.user_id]
        for clause, value in (
            ("action = %s", where.action),
            ("actor_id = %s", where.actor),
            ("resource_type = %s", where.resource_type),
            ("resource_id = %s", where.resource_id),
            ("outcome = %s", where.outcome),
            ("at >= %s", where.since),
            ("at < %s", where.until),
            ("seq < %s", below_seq),
        ):
            if value is not None:
                clauses.append(SQL(clause))  # clause: one of the literals above
                params.append(value)
        query = self._sql(
            "SELECT {cols} FROM {s}.entries WHERE {where} ORDER BY seq DESC LIMIT %s",
            where=SQL(" AND ").join(clauses),
        )
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, [*params, limit])
            return [_entry(row) for row in await cur.fetchall()]

    async def summary(self) -> tuple[list[Head], int, int]:
        """(chain heads, entry count, newest stream seq), read in one snapshot."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self._sql(
                    "SELECT h.org_id, h.seq, h.hash, t.n, t.top FROM "
                    "(SELECT count(*) AS n, coalesce(max(stream_seq), 0) AS top "
                    "FROM {s}.entries) t LEFT JOIN {s}.chain_heads h ON true"
                )
            )
            rows = await cur.fetchall()
        heads = [Head(str(r[0]), int(r[1]), str(r[2])) for r in rows if r[0] is not None]
        return heads, int(rows[0][3]), int(rows[0][4])

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[tuple[list[Head], AsyncIterator[Entry]]]:
        """The chain heads, and every entry streamed in (org, seq) order, as of one moment."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur = await conn.execute(self._sql("SELECT org_id, seq, hash FROM {s}.chain_heads"))
            heads = [Head(str(r[0]), int(r[1]), str(r[2])) for r in await cur.fetchall()]
            async with conn.cursor(name="audit_walk") as entries:
                await entries.execute(self._sql("SELECT {cols} FROM {s}.entries ORDER BY org_id, seq"))
                yield heads, (_entry(row) async for row in entries)


def _row(entry: Entry) -> tuple[Any, ...]:
    """An entry as the columns of `_COLUMNS`, in order."""
    a = entry.actor
    return (
        entry.id,
        entry.org_id,
        entry.seq,
        entry.stream_seq,
        entry.at,
        a.kind,
        a.id,
        a.key_id,
        a.ip,
        a.user_agent,
        entry.subject_user_id,
        entry.action,
        entry.resource_type,
        entry.resource_id,
        entry.outcome,
        entry.metadata,  # jsonb: dumped by `_encoder` (see `write_entries`)
        entry.correlation_id,
        entry.trace_id,
        entry.prev_hash,
        entry.hash,
    )


def _utc(at: datetime) -> datetime:
    return at.astimezone(UTC)


def _entry(row: Any) -> Entry:
    return Entry(
        id=row[0],
        org_id=row[1],
        seq=row[2],
        stream_seq=row[3],
        at=_utc(row[4]),
        actor=Actor(kind=row[5], id=row[6], key_id=row[7], ip=row[8], user_agent=row[9]),
        subject_user_id=row[10],
        action=row[11],
        resource_type=row[12],
        resource_id=row[13],
        outcome=row[14],
        metadata=row[15],
        correlation_id=row[16],
        trace_id=row[17],
        prev_hash=row[18],
        hash=row[19],
    )
