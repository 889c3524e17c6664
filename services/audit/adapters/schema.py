"""The audit schema's tables, created idempotently when a service instance starts.

Every page is one org's entries, newest (highest seq) first, with at most one or two
filters: each index leads with the org, then `seq` (then `at`), so PostgreSQL walks the
index backwards and stops after `limit` rows instead of sorting the org's matches (~1 ms at
1,000,000 entries; see docs/replay.md).
"""

from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.sql import SQL, Identifier

_DDL_LOCK = 0x6761746568617564  # advisory lock: two instances starting at once create once

_TABLES = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.entries (
    id text PRIMARY KEY,
    org_id text NOT NULL,
    seq bigint NOT NULL,
    stream_seq bigint NOT NULL UNIQUE,
    at timestamptz NOT NULL,
    actor_kind text NOT NULL,
    actor_id text NOT NULL,
    actor_key_id text,
    actor_ip text,
    actor_user_agent text,
    subject_user_id text,
    action text NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    outcome text NOT NULL,
    metadata jsonb NOT NULL,
    correlation_id text,
    trace_id text,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    UNIQUE (org_id, seq)
);
DROP INDEX IF EXISTS {s}.entries_org_action;
DROP INDEX IF EXISTS {s}.entries_actor;
DROP INDEX IF EXISTS {s}.entries_subject_user;
DROP INDEX IF EXISTS {s}.entries_at;
DROP INDEX IF EXISTS {s}.entries_org_action_seq;
DROP INDEX IF EXISTS {s}.entries_org_actor_seq;
DROP INDEX IF EXISTS {s}.entries_org_subject_seq;
DROP INDEX IF EXISTS {s}.entries_org_resource_seq;
DROP INDEX IF EXISTS {s}.entries_org_at;
CREATE TABLE IF NOT EXISTS {s}.chain_heads (
    org_id text PRIMARY KEY,
    seq bigint NOT NULL,
    hash text NOT NULL
);
"""


# The indexes pages are read through. A rebuild drops them with the entries and makes them
# again once caught up: building an index over a million rows at the end costs far less
# than keeping six of them up to date row by row (see docs/replay.md).
# Each ends with `at` after `seq`: a since/until window is then checked on the index entry
# itself while the scan walks seq downwards, instead of fetching every newer row from the
# table to read its time (482 ms for a window over a 300,000-entry org without it).
READ_INDEXES = {
    "entries_org_action_seq_at": "org_id, action, seq, at",
    "entries_org_actor_seq_at": "org_id, actor_id, seq, at",
    "entries_org_subject_seq_at": "org_id, subject_user_id, seq, at",
    "entries_org_resource_seq_at": "org_id, resource_id, seq, at",
    "entries_org_type_seq_at": "org_id, resource_type, seq, at",
    "entries_org_seq_at": "org_id, seq, at",
}


async def create_tables(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    """Also makes any read index that is missing (a rebuild that did not finish)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_DDL_LOCK])
        for statement in _TABLES.split(";"):
            if statement.strip():
                await conn.execute(SQL(statement).format(s=Identifier(schema)))
        await create_read_indexes(conn, schema)


async def create_read_indexes(
    conn: psycopg.AsyncConnection[Any], schema: str, names: Iterable[str] = READ_INDEXES
) -> None:
    for name in names:
        columns = READ_INDEXES[name]
        await conn.execute(
            SQL("CREATE INDEX IF NOT EXISTS {} ON {}.entries ({})").format(
                Identifier(name),
                Identifier(schema),
                SQL(columns),  # columns: literals above
            )
        )


async def drop_read_indexes(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    for name in READ_INDEXES:
        await conn.execute(SQL("DROP INDEX IF EXISTS {}.{}").format(Identifier(schema), Identifier(name)))
