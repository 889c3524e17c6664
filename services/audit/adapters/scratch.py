"""Investigations: the trail as it stood at a past moment, rebuilt into a schema of its own.

`gatehouse replay audit --until T` replays the prefix of the stream stored at or before T into
`audit_until_<T as yyyymmddThhmmssZ>` (same tables as the live trail, so the same queries and
`verify` work there) and reports its digest. The live trail is never touched; replaying the
same moment again starts that schema afresh. Drop it with `DROP SCHEMA … CASCADE` when done.
"""

from datetime import UTC, datetime

from psycopg.sql import SQL, Identifier

from contracts.subjects import ALL_EVENTS
from services.audit.adapters.store import AuditStore
from services.audit.application import Audit
from services.audit.domain import Digest
from services.kit.bus import Bus
from services.kit.projection import replay_into

PREFIX = "audit_until_"


def scratch_schema(until: datetime) -> str:
    return PREFIX + until.astimezone(UTC).strftime("%Y%m%dt%H%M%Sz")


class ScratchReplays:
    def __init__(self, bus: Bus, database_url: str) -> None:
        self.bus, self.database_url = bus, database_url

    async def __call__(self, until: datetime) -> tuple[str, Digest]:
        schema = scratch_schema(until)
        store = AuditStore(self.database_url, schema, pool_size=2)
        await store.start()  # creates the schema and its tables
        try:
            async with store.pool.connection() as conn, conn.transaction():
                await store.reset(conn)
                positions = SQL("DROP TABLE IF EXISTS {}.projection_positions").format(Identifier(schema))
                await conn.execute(positions)
            audit = Audit(store, cursor_key=b"scratch")
            await replay_into(
                self.bus,
                self.database_url,
                schema,
                ALL_EVENTS,
                audit.apply_batch,
                until=until,
                prepare=audit.prepare,
            )
            await store.rebuilt()  # the read indexes `reset` dropped
            return schema, await audit.digest()
        finally:
            await store.stop()
