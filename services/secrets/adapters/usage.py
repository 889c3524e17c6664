"""When each secret was last used: `secrets.usage`, kept from the reveals the service records.

A plain table rather than state on the Secret aggregate: a reveal then loads nothing and
never conflicts with a concurrent set or revoke. It only ever moves forward (GREATEST), so
batches recorded out of order or twice leave it right.
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
    last_used_at timestamptz NOT NULL
);
"""


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
        with pool.connection() as conn:
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
                    "DO UPDATE SET last_used_at = GREATEST({s}.usage.last_used_at, EXCLUDED.last_used_at)"
                ).format(s=Identifier(self.schema)),
                sorted(used.items()),  # a fixed order: two instances never deadlock on the rows
            )

    def last_used(self, secret_ids: list[str]) -> dict[str, datetime]:
        if not secret_ids:
            return {}
        with self.pool.connection() as conn:
            rows = conn.execute(
                SQL("SELECT secret_id, last_used_at FROM {s}.usage WHERE secret_id = ANY(%s::uuid[])").format(
                    s=Identifier(self.schema)
                ),
                [secret_ids],
            ).fetchall()
        return {str(r[0]): r[1] for r in rows}

    def forget(self, secret_id: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                SQL("DELETE FROM {s}.usage WHERE secret_id = %s").format(s=Identifier(self.schema)),
                [secret_id],
            )


class MemoryUsage:
    def __init__(self) -> None:
        self.rows: dict[str, datetime] = {}
        self._lock = threading.Lock()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def touch(self, used: dict[str, datetime]) -> None:
        with self._lock:
            for secret_id, at in used.items():
                before = self.rows.get(secret_id)
                self.rows[secret_id] = at if before is None else max(before, at)

    def last_used(self, secret_ids: list[str]) -> dict[str, datetime]:
        return {i: self.rows[i] for i in secret_ids if i in self.rows}

    def forget(self, secret_id: str) -> None:
        with self._lock:
            self.rows.pop(secret_id, None)
