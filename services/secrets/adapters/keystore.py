"""Where wrapped data keys live: a plain table, `secrets.data_keys`, outside the event log.

Events are immutable, so the one thing that must be destroyable is kept here: one row per
data key (secret id, value version, master key id, wrapped bytes). Revoking a secret deletes
its rows (crypto-shredding: the ciphertext in the events stays, unreadable for good); a
rewrap updates `kid` and `wrapped` in place. The fingerprint key is a row too (secret id
nil), so rewrap, key status and the startup check cover it like any data key.

`MemoryKeystore` is the same contract in a dict, for tests that run without PostgreSQL.
"""

import threading
from typing import Any

import msgspec
from psycopg.sql import SQL, Identifier
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from services.secrets.crypto import WrappedKey

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.data_keys (
    id uuid PRIMARY KEY,
    secret_id uuid NOT NULL,
    version integer NOT NULL,
    kid text NOT NULL,
    wrapped bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz
);
CREATE INDEX IF NOT EXISTS data_keys_secret ON {s}.data_keys (secret_id);
CREATE INDEX IF NOT EXISTS data_keys_kid ON {s}.data_keys (kid);
"""
_DDL_LOCK = 0x67617465736563  # advisory lock: two instances starting at once create once


class KeyRow(msgspec.Struct, frozen=True):
    id: str
    secret_id: str
    version: int
    wrapped: WrappedKey


class PostgresKeystore:
    def __init__(self, database_url: str, schema: str = "secrets", pool_size: int = 8) -> None:
        self.database_url, self.schema, self.pool_size = database_url, schema, pool_size
        self._pool: ConnectionPool[Any] | None = None

    def open(self) -> None:
        """Creates the table and opens the pool (synchronous: call it from a worker thread)."""
        if self._pool is not None:
            return
        pool: ConnectionPool[Any] = ConnectionPool(
            self.database_url,
            min_size=2,
            max_size=self.pool_size,
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

    # a host component
    async def start(self) -> None:
        pass  # opened by the composition root, before the application reads its keys

    async def stop(self) -> None:
        self.close()

    @property
    def pool(self) -> ConnectionPool[Any]:
        if self._pool is None:
            raise RuntimeError("the keystore is not open")
        return self._pool

    def _q(self, text: str) -> Any:
        return SQL(text).format(s=Identifier(self.schema))

    # -- the contract ---------------------------------------------------------------------
    def add(self, row: KeyRow) -> bool:
        with self.pool.connection() as conn:
            cur = conn.execute(
                self._q(
                    "INSERT INTO {s}.data_keys (id, secret_id, version, kid, wrapped) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING"
                ),
                [row.id, row.secret_id, row.version, row.wrapped.kid, row.wrapped.wrapped],
            )
            return cur.rowcount == 1

    def get(self, data_key_id: str) -> WrappedKey | None:
        with self.pool.connection() as conn:
            found = conn.execute(
                self._q("SELECT kid, wrapped FROM {s}.data_keys WHERE id = %s"), [data_key_id]
            ).fetchone()
        return WrappedKey(found[0], bytes(found[1])) if found else None

    def live(self, secret_ids: list[str]) -> list[KeyRow]:
        """Every data key still held for these secrets (revoked ones have none)."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT id, secret_id, version, kid, wrapped FROM {s}.data_keys "
                    "WHERE secret_id = ANY(%s::uuid[])"
                ),
                [secret_ids],
            ).fetchall()
        return [_row(r) for r in rows]

    def destroy(self, data_key_id: str) -> int:
        with self.pool.connection() as conn:
            return conn.execute(self._q("DELETE FROM {s}.data_keys WHERE id = %s"), [data_key_id]).rowcount

    def destroy_secret(self, secret_id: str) -> int:
        with self.pool.connection() as conn:
            return conn.execute(
                self._q("DELETE FROM {s}.data_keys WHERE secret_id = %s"), [secret_id]
            ).rowcount

    def kids_of(self, data_key_ids: list[str]) -> dict[str, str]:
        if not data_key_ids:
            return {}
        with self.pool.connection() as conn:
            rows = conn.execute(
                self._q("SELECT id, kid FROM {s}.data_keys WHERE id = ANY(%s::uuid[])"), [data_key_ids]
            ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def usage(self) -> dict[str, int]:
        with self.pool.connection() as conn:
            rows = conn.execute(self._q("SELECT kid, count(*) FROM {s}.data_keys GROUP BY kid")).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def sample(self, kid: str, limit: int) -> list[KeyRow]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT id, secret_id, version, kid, wrapped FROM {s}.data_keys WHERE kid = %s "
                    "ORDER BY created_at LIMIT %s"
                ),
                [kid, limit],
            ).fetchall()
        return [_row(r) for r in rows]

    def not_under(self, kid: str, after: str, limit: int) -> list[KeyRow]:
        """A page (by id) of the keys wrapped under any other master key than `kid`."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT id, secret_id, version, kid, wrapped FROM {s}.data_keys "
                    "WHERE kid <> %s AND id > %s::uuid ORDER BY id LIMIT %s"
                ),
                [kid, after, limit],
            ).fetchall()
        return [_row(r) for r in rows]

    def replace(self, updates: list[tuple[str, str, WrappedKey]]) -> int:
        """(id, kid it had, new wrapping): one transaction; a row changed meanwhile is left alone."""
        if not updates:
            return 0
        with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor()
            cur.executemany(
                self._q(
                    "UPDATE {s}.data_keys SET kid = %s, wrapped = %s, rewrapped_at = now() "
                    "WHERE id = %s AND kid = %s"
                ),
                [(new.kid, new.wrapped, key_id, old_kid) for key_id, old_kid, new in updates],
                returning=False,
            )
            return int(cur.rowcount)


class PostgresKeyReader:
    """The one keystore read on the reveal path, on the event loop (no worker-thread hop)."""

    def __init__(self, database_url: str, schema: str = "secrets", pool_size: int = 8) -> None:
        self.database_url, self.schema, self.pool_size = database_url, schema, pool_size
        self._pool: AsyncConnectionPool[Any] | None = None
        self._live = SQL(
            "SELECT id, secret_id, version, kid, wrapped FROM {s}.data_keys WHERE secret_id = ANY(%s::uuid[])"
        ).format(s=Identifier(schema))

    async def start(self) -> None:
        self._pool = AsyncConnectionPool(
            self.database_url,
            min_size=2,
            max_size=self.pool_size,
            open=False,
            kwargs={"connect_timeout": 5, "autocommit": True},
        )
        await self._pool.open(wait=True, timeout=10)

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def live(self, secret_ids: list[str]) -> list[KeyRow]:
        if self._pool is None:
            raise RuntimeError("the key reader is not started")
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._live, [secret_ids])
            rows = await cur.fetchall()
        return [_row(r) for r in rows]


def _row(r: Any) -> KeyRow:
    return KeyRow(str(r[0]), str(r[1]), int(r[2]), WrappedKey(str(r[3]), bytes(r[4])))


class MemoryKeystore:
    """The keystore contract in memory (unit tests)."""

    def __init__(self) -> None:
        self.rows: dict[str, KeyRow] = {}
        self._lock = threading.Lock()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def add(self, row: KeyRow) -> bool:
        with self._lock:
            if row.id in self.rows:
                return False
            self.rows[row.id] = row
            return True

    def get(self, data_key_id: str) -> WrappedKey | None:
        row = self.rows.get(data_key_id)
        return row.wrapped if row else None

    def live(self, secret_ids: list[str]) -> list[KeyRow]:
        wanted = set(secret_ids)
        return [r for r in list(self.rows.values()) if r.secret_id in wanted]

    def destroy(self, data_key_id: str) -> int:
        with self._lock:
            return 1 if self.rows.pop(data_key_id, None) else 0

    def destroy_secret(self, secret_id: str) -> int:
        with self._lock:
            doomed = [k for k, r in self.rows.items() if r.secret_id == secret_id]
            for key in doomed:
                del self.rows[key]
            return len(doomed)

    def kids_of(self, data_key_ids: list[str]) -> dict[str, str]:
        return {i: self.rows[i].wrapped.kid for i in data_key_ids if i in self.rows}

    def usage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in list(self.rows.values()):
            out[r.wrapped.kid] = out.get(r.wrapped.kid, 0) + 1
        return out

    def sample(self, kid: str, limit: int) -> list[KeyRow]:
        return [r for r in list(self.rows.values()) if r.wrapped.kid == kid][:limit]

    def not_under(self, kid: str, after: str, limit: int) -> list[KeyRow]:
        rows = sorted((r for r in self.rows.values() if r.wrapped.kid != kid and r.id > after), key=_by_id)
        return rows[:limit]

    def replace(self, updates: list[tuple[str, str, WrappedKey]]) -> int:
        done = 0
        with self._lock:
            for key_id, old_kid, new in updates:
                row = self.rows.get(key_id)
                if row is not None and row.wrapped.kid == old_kid:
                    self.rows[key_id] = msgspec.structs.replace(row, wrapped=new)
                    done += 1
        return done


def _by_id(row: KeyRow) -> str:
    return row.id
