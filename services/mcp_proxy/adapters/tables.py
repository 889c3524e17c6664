"""mcp_proxy's read tables in PostgreSQL (schema `mcp_proxy`): call history and server status.

`history` is a projection of `ToolCallCompleted` events (one row per event, written on
the projection consumer's connection inside its transaction, so a row and the stream
position commit together; a replayed event is kept once by its event id). `server_status`
is operational state, not a projection: what each user's last probe or call of each
server showed, shared by every instance.
"""

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.sql import SQL, Composed, Identifier
from psycopg_pool import AsyncConnectionPool

from contracts.events.mcp import ToolCallCompleted
from services.kit.projection import Delivered
from services.mcp_proxy.application.ports import ServerStatus
from services.mcp_proxy.domain.history import Digest

Conn = psycopg.AsyncConnection[Any]
_DDL_LOCK = 0x6D63705F70726F78  # "mcp_prox": instances starting together create once

_TABLES = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.history (
    event_id text PRIMARY KEY,
    stream_seq bigint NOT NULL UNIQUE,
    user_id text NOT NULL,
    org_id text,
    request_id text NOT NULL,
    server text NOT NULL,
    tool_name text NOT NULL,
    status text NOT NULL,
    duration_ms double precision NOT NULL,
    arguments_sha256 text NOT NULL,
    arguments_bytes bigint NOT NULL,
    result_bytes bigint NOT NULL,
    reached_upstream boolean NOT NULL,
    error text,
    at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS history_user ON {s}.history (user_id, stream_seq DESC);
CREATE INDEX IF NOT EXISTS history_user_server ON {s}.history (user_id, server, stream_seq DESC);
CREATE TABLE IF NOT EXISTS {s}.server_status (
    user_id text NOT NULL,
    server_id text NOT NULL,
    status text NOT NULL,
    tools_count int NOT NULL,
    error text,
    checked_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, server_id)
);
"""
_COLUMNS = (
    "event_id, stream_seq, user_id, org_id, request_id, server, tool_name, status, duration_ms, "
    "arguments_sha256, arguments_bytes, result_bytes, reached_upstream, error, at"
)


HistoryRow = tuple[Any, ...]  # a row of `history`, in _COLUMNS order


class ProxyTables:
    def __init__(self, database_url: str, schema: str = "mcp_proxy", pool_size: int = 4) -> None:
        self.database_url, self.schema, self.pool_size = database_url, schema, pool_size
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._insert_history = self._sql(
            "INSERT INTO {s}.history ({cols}) VALUES "
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
        )

    def _sql(self, text: str, **parts: Any) -> Composed:
        return SQL(text).format(s=Identifier(self.schema), cols=SQL(_COLUMNS), **parts)

    async def start(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url, connect_timeout=5) as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_DDL_LOCK])
                for statement in _TABLES.split(";"):
                    if statement.strip():
                        await conn.execute(self._sql(statement))
        self._pool = AsyncConnectionPool(
            self.database_url, min_size=1, max_size=self.pool_size, open=False, kwargs={"connect_timeout": 5}
        )
        await self._pool.open(wait=True, timeout=10)

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise RuntimeError("the mcp_proxy tables are not started")
        return self._pool

    # -- history: writes on the projection's connection -------------------------------------
    async def apply_batch(self, conn: Conn, batch: list[Delivered]) -> None:
        """The ProjectionConsumer's `apply_batch`: each ToolCallCompleted becomes a row (one
        pipelined round trip for the batch); the rest is skipped."""
        rows = [_history_row(d) for d in batch if isinstance(d.payload, ToolCallCompleted) and d.envelope]
        if rows:
            async with conn.cursor() as cur:
                await cur.executemany(self._insert_history, rows)

    async def reset(self, conn: Conn) -> None:
        await conn.execute(self._sql("TRUNCATE {s}.history"))

    # -- history: reads ---------------------------------------------------------------------
    async def page(self, user_id: str, server: str | None, below: int | None, limit: int) -> list[HistoryRow]:
        """The user's calls, newest (highest stream seq) first."""
        clauses = [SQL("user_id = %s")]
        params: list[Any] = [user_id]
        if server is not None:
            clauses.append(SQL("server = %s"))
            params.append(server)
        if below is not None:
            clauses.append(SQL("stream_seq < %s"))
            params.append(below)
        query = self._sql(
            "SELECT {cols} FROM {s}.history WHERE {where} ORDER BY stream_seq DESC LIMIT %s",
            where=SQL(" AND ").join(clauses),
        )
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, [*params, limit])
            return [tuple(row) for row in await cur.fetchall()]

    async def digest(self) -> tuple[Digest, int]:
        """The digest of every row in stream order, and the highest stream seq applied."""
        digest = Digest()
        top = 0
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            async with conn.cursor(name="history_walk") as cur:
                await cur.execute(self._sql("SELECT {cols} FROM {s}.history ORDER BY stream_seq"))
                async for row in _rows(cur):
                    at = row[14].astimezone(UTC).isoformat()
                    digest.add((*row[:14], at), user_id=row[2], org_id=row[3])
                    top = row[1]
        return digest, top

    # -- server status ------------------------------------------------------------------------
    async def note(self, user_id: str, server_id: str, status: ServerStatus) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                self._sql(
                    "INSERT INTO {s}.server_status "
                    "(user_id, server_id, status, tools_count, error, checked_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (user_id, server_id) DO UPDATE SET "
                    "status = EXCLUDED.status, tools_count = EXCLUDED.tools_count, error = EXCLUDED.error, "
                    "checked_at = EXCLUDED.checked_at"
                ),
                [user_id, server_id, status.status, status.tools_count, status.error, datetime.now(UTC)],
            )

    async def read(self, user_id: str) -> dict[str, ServerStatus]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self._sql(
                    "SELECT server_id, status, tools_count, error FROM {s}.server_status WHERE user_id = %s"
                ),
                [user_id],
            )
            return {r[0]: ServerStatus(r[1], r[2], r[3]) for r in await cur.fetchall()}


async def _rows(cur: Any) -> AsyncIterator[Any]:
    async for row in cur:
        yield row


def _history_row(d: Delivered) -> list[Any]:
    p, envelope = d.payload, d.envelope
    assert isinstance(p, ToolCallCompleted) and envelope is not None
    return [
        envelope.event_id,
        d.stream_seq,
        p.user_id,
        envelope.org_id,
        p.request_id,
        p.server,
        p.tool_name,
        p.status,
        p.duration_ms,
        p.arguments_sha256,
        p.arguments_bytes,
        p.result_bytes,
        p.reached_upstream,
        p.error,
        p.started_at,
    ]
