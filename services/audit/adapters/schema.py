"""The audit schema's tables, created idempotently when a service instance starts."""

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
CREATE INDEX IF NOT EXISTS entries_org_action ON {s}.entries (org_id, action);
CREATE INDEX IF NOT EXISTS entries_actor ON {s}.entries (actor_id);
CREATE INDEX IF NOT EXISTS entries_subject_user ON {s}.entries (subject_user_id);
CREATE INDEX IF NOT EXISTS entries_at ON {s}.entries (at);
CREATE TABLE IF NOT EXISTS {s}.chain_heads (
    org_id text PRIMARY KEY,
    seq bigint NOT NULL,
    hash text NOT NULL
);
"""


async def create_tables(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_DDL_LOCK])
        for statement in _TABLES.split(";"):
            if statement.strip():
                await conn.execute(SQL(statement).format(s=Identifier(schema)))
