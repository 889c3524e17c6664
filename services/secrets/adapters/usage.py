"""When each secret was last used: `secrets.usage`, kept from the reveals the service records.

A plain table rather than state on the Secret aggregate: a reveal then loads nothing and
never conflicts with a concurrent set or revoke. It only ever moves forward (GREATEST), so
batches recorded out of order or twice leave it right.

Reveals are recorded in batches, after the fact, so a batch can land after the secret was
revoked (and even set again: a secret's id is derived from its name). A revocation therefore
leaves a tombstone (`forgotten_at`) instead of deleting the row, and a reveal older than the
tombstone never moves `last_used_at` again.
"""

import threading
from datetime import datetime
from typing import Any

from psycopg.sql import SQL, Identifier
from psycopg_pool import ConnectionPool

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.usage (
    secret_id uuid PRIMARY KEY,
    last_used_at timestamptz
);
ALTER TABLE {s}.usage ALTER COLUMN last_used_at DROP NOT NULL;
ALTER TABLE {s}.usage ADD COLUMN IF NOT EXISTS forgotten_at timestamptz;
"""
_DDL_LOCK = 0x6761746575736167  # advisory lock: instances starting at once create (and migrate) once


class PostgresUsage:
    def __init__(self, database_url: str, schema: str = "secrets") -> None:
        self.database_url, self.schema = database_url, schema
        self._pool: ConnectionPool[Any] | None = None

    def open(self) -> None:
        if self._pool is not None:
            return
        pool: ConnectionPool[Any] = ConnectionPool(
            self.database_url,
            min_size=1,
            max_size=3,
            open=False,
            kwargs={"connect_timeout": 5, "autocommit": True},
        )
        pool.open(wait=True, timeout=10)
        with pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_DDL_LOCK])
            conn.execute(SQL(_DDL).format(s=Identifier(self.schema)))
        self._pool = pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.close()

    @property
    def pool(self) -> ConnectionPool[Any]:
        if self._pool is None:
            raise RuntimeError("the usage table is not open")
        return self._pool

    def touch(self, used: dict[str, datetime]) -> None:
        if not used:
            return
        with self.pool.connection() as conn, conn.transaction():
            conn.cursor().executemany(
                SQL(
                    "INSERT INTO {s}.usage (secret_id, last_used_at) VALUES (%s, %s) ON CONFLICT (secret_id) "
                    "DO UPDATE SET last_used_at = GREATEST({s}.usage.last_used_at, EXCLUDED.last_used_at) "
                    "WHERE {s}.usage.forgotten_at IS NULL OR EXCLUDED.last_used_at > {s}.usage.forgotten_at"
                ).format(s=Identifier(self.schema)),
                sorted(used.items()),  # a fixed order: two instances never deadlock on the rows
            )

    def last_used(self, secret_ids: list[str]) -> dict[str, datetime]:
        if not secret_ids:
            return {}
        with self.pool.connection() as conn:
            rows = conn.execute(
                SQL(
                    "SELECT secret_id, last_used_at FROM {s}.usage "
                    "WHERE secret_id = ANY(%s::uuid[]) AND last_used_at IS NOT NULL"
                ).format(s=Identifier(self.schema)),
                [secret_ids],
            ).fetchall()
        return {str(r[0]): r[1] for r in rows}

    def forget(self, secret_id: str, at: datetime) -> None:
        """Clears the secret's use as of `at`; reveals recorded later but made before stay out."""
        with self.pool.connection() as conn:
            conn.execute(
                SQL(
                    "INSERT INTO {s}.usage (secret_id, last_used_at, forgotten_at) VALUES (%s, NULL, %s) "
                    "ON CONFLICT (secret_id) DO UPDATE SET last_used_at = NULL, "
                    "forgotten_at = GREATEST({s}.usage.forgotten_at, EXCLUDED.forgotten_at)"
                ).format(s=Identifier(self.schema)),
                [secret_id, at],
            )


class MemoryUsage:
    def __init__(self) -> None:
        self.rows: dict[str, datetime] = {}
        self.forgotten: dict[str, datetime] = {}
        self._lock = threading.Lock()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def touch(self, used: dict[str, datetime]) -> None:
        with self._lock:
            for secret_id, at in used.items():
                if secret_id in self.forgotten and at <= self.forgotten[secret_id]:
                    continue
                before = self.rows.get(secret_id)
                self.rows[secret_id] = at if before is None else max(before, at)

    def last_used(self, secret_ids: list[str]) -> dict[str, datetime]:
        return {i: self.rows[i] for i in secret_ids if i in self.rows}

    def forget(self, secret_id: str, at: datetime) -> None:
        with self._lock:
            self.rows.pop(secret_id, None)
            self.forgotten[secret_id] = max(at, self.forgotten.get(secret_id, at))
