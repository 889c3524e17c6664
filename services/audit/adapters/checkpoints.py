"""Signed checkpoints in PostgreSQL (`audit.checkpoints`), and the retention sweep.

Checkpoints are not part of the projection: a rebuild (`TRUNCATE entries, chain_heads`)
keeps them, and the rebuilt chains must reach them again, hash for hash. The table shares
the audit store's pool; its entry reads reuse the store's row mapping.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.sql import SQL, Composable, Composed, Identifier

from services.audit.adapters.store import _COLUMNS, AuditStore, _entry
from services.audit.domain import RETENTION, Checkpoint, Entry, Head

Conn = psycopg.AsyncConnection[Any]
KEEP = 10  # checkpoints kept per org and kind
_SWEEP_LOCK = 0x6761746572657431  # one retention sweep at a time, across instances
_CP_COLUMNS = "org_id, seq, hash, at, kind, key_id, signature"

_DDL = """
CREATE TABLE IF NOT EXISTS {s}.checkpoints (
    org_id text NOT NULL,
    kind text NOT NULL,
    seq bigint NOT NULL,
    hash text NOT NULL,
    at timestamptz NOT NULL,
    key_id text NOT NULL,
    signature text NOT NULL,
    PRIMARY KEY (org_id, kind, seq)
)
"""

Sign = Callable[[Checkpoint], Checkpoint]


class CheckpointStore:
    def __init__(self, store: AuditStore) -> None:
        self.store = store

    def _sql(self, text: str, **parts: Composable) -> Composed:
        return SQL(text).format(
            s=Identifier(self.store.schema), cols=SQL(_COLUMNS), cp=SQL(_CP_COLUMNS), **parts
        )

    async def create(self) -> None:
        async with self.store.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_SWEEP_LOCK])
            await conn.execute(self._sql(_DDL))

    # -- signing heads ----------------------------------------------------------------------
    async def heads_and_newest(self) -> tuple[list[Head], dict[str, Checkpoint]]:
        async with self.store.pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur = await conn.execute(self._sql("SELECT org_id, seq, hash FROM {s}.chain_heads"))
            heads = [Head(str(r[0]), int(r[1]), str(r[2])) for r in await cur.fetchall()]
            cur = await conn.execute(
                self._sql("SELECT DISTINCT ON (org_id) {cp} FROM {s}.checkpoints ORDER BY org_id, seq DESC")
            )
            newest = {cp.org_id: cp for cp in map(_checkpoint, await cur.fetchall())}
        return heads, newest

    async def record(self, checkpoints: list[Checkpoint]) -> None:
        """Adds signed checkpoints (and forgets all but the newest few of each org and kind)."""
        if not checkpoints:
            return
        async with self.store.pool.connection() as conn, conn.transaction():
            for cp in checkpoints:
                await self._insert(conn, cp)
            await self._prune(conn, [cp.org_id for cp in checkpoints])

    async def _prune(self, conn: Conn, orgs: list[str]) -> None:
        """The newest checkpoint vouches for every entry before it, so older ones add little."""
        await conn.execute(
            self._sql(
                "DELETE FROM {s}.checkpoints c USING (SELECT org_id, kind, seq, row_number() OVER "
                "(PARTITION BY org_id, kind ORDER BY seq DESC) AS n FROM {s}.checkpoints "
                "WHERE org_id = ANY(%s)) old WHERE c.org_id = old.org_id AND c.kind = old.kind "
                "AND c.seq = old.seq AND old.n > %s"
            ),
            [orgs, KEEP],
        )

    async def _insert(self, conn: Conn, cp: Checkpoint) -> None:
        await conn.execute(
            self._sql(
                "INSERT INTO {s}.checkpoints ({cp}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING"
            ),
            [cp.org_id, cp.seq, cp.hash, cp.at, cp.kind, cp.key_id, cp.signature],
        )

    # -- retention --------------------------------------------------------------------------
    async def sweep(self, cutoff: datetime, now: datetime, sign: Sign) -> list[Checkpoint]:
        """Deletes, per org, the longest prefix of entries older than `cutoff`.

        Each deletion is preceded (in the same transaction) by a signed retention checkpoint
        naming the last deleted seq and its hash, where `verify` then starts the chain.
        """
        done: list[Checkpoint] = []
        async with self.store.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_SWEEP_LOCK])
            cur = await conn.execute(
                self._sql(
                    "SELECT e.org_id, min(e.seq), coalesce((SELECT min(x.seq) - 1 FROM {s}.entries x "
                    "WHERE x.org_id = e.org_id AND x.at >= %s), max(e.seq)) "
                    "FROM {s}.entries e GROUP BY e.org_id"
                ),
                [cutoff],
            )
            candidates = await cur.fetchall()
            # The newest entry of all dates undecodable messages (AuditStore.last_at): it stays,
            # so the live trail and a rebuild date them alike.
            cur = await conn.execute(
                self._sql("SELECT org_id, seq FROM {s}.entries ORDER BY stream_seq DESC LIMIT 1")
            )
            newest = await cur.fetchone()
            for org_id, lowest, upto in candidates:
                if upto is not None and newest is not None and org_id == newest[0]:
                    upto = min(int(upto), int(newest[1]) - 1)
                if upto is None or int(upto) < int(lowest):
                    continue
                done.append(await self._cut(conn, str(org_id), int(upto), now, sign))
            if done:
                await self._prune(conn, [cp.org_id for cp in done])
        return done

    async def _cut(self, conn: Conn, org_id: str, upto: int, now: datetime, sign: Sign) -> Checkpoint:
        cur = await conn.execute(
            self._sql("SELECT hash FROM {s}.entries WHERE org_id = %s AND seq = %s"), [org_id, upto]
        )
        row = await cur.fetchone()
        assert row is not None  # upto lies between the org's lowest and highest seq
        cp = sign(Checkpoint(org_id=org_id, seq=upto, hash=str(row[0]), at=now, kind=RETENTION))
        await self._insert(conn, cp)
        await conn.execute(
            self._sql("DELETE FROM {s}.entries WHERE org_id = %s AND seq <= %s"), [org_id, upto]
        )
        return cp

    async def reapply(self) -> int:
        """After a rebuild: deletes again what recorded retention checkpoints say was deleted.

        Only where the rebuilt entry at the checkpoint's seq has the signed hash; elsewhere the
        entries stay, and `verify` names the difference. Returns how many entries went.
        """
        removed = 0
        async with self.store.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_SWEEP_LOCK])
            cur = await conn.execute(
                self._sql(
                    "SELECT DISTINCT ON (org_id) {cp} FROM {s}.checkpoints WHERE kind = %s "
                    "ORDER BY org_id, seq DESC"
                ),
                [RETENTION],
            )
            for base in map(_checkpoint, await cur.fetchall()):
                deleted = await conn.execute(
                    self._sql(
                        "DELETE FROM {s}.entries WHERE org_id = %s AND seq <= %s AND EXISTS (SELECT 1 "
                        "FROM {s}.entries WHERE org_id = %s AND seq = %s AND hash = %s)"
                    ),
                    [base.org_id, base.seq, base.org_id, base.seq, base.hash],
                )
                removed += max(deleted.rowcount, 0)
        return removed

    # -- verification -----------------------------------------------------------------------
    @asynccontextmanager
    async def snapshot(
        self,
    ) -> AsyncIterator[tuple[list[Checkpoint], list[Head], AsyncIterator[Entry]]]:
        """Checkpoints, chain heads and every entry in (org, seq) order, as of one moment."""
        async with self.store.pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur = await conn.execute(self._sql("SELECT {cp} FROM {s}.checkpoints ORDER BY org_id, seq"))
            checkpoints = [_checkpoint(r) for r in await cur.fetchall()]
            cur = await conn.execute(self._sql("SELECT org_id, seq, hash FROM {s}.chain_heads"))
            heads = [Head(str(r[0]), int(r[1]), str(r[2])) for r in await cur.fetchall()]
            async with conn.cursor(name="audit_verify") as entries:
                await entries.execute(self._sql("SELECT {cols} FROM {s}.entries ORDER BY org_id, seq"))
                yield checkpoints, heads, (_entry(row) async for row in entries)


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(
        org_id=str(row[0]),
        seq=int(row[1]),
        hash=str(row[2]),
        at=row[3].astimezone(UTC),
        kind=str(row[4]),
        key_id=str(row[5]),
        signature=str(row[6]),
    )
