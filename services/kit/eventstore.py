"""Each service's eventsourcing application on PostgreSQL, in a schema of its own."""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from eventsourcing.persistence import IntegrityError, Notification, StoredEvent
from psycopg.conninfo import conninfo_to_dict
from psycopg.sql import SQL, Composed, Identifier

from services.kit.config import Settings


def postgres_env(database_url: str, schema: str) -> dict[str, str]:
    """eventsourcing's POSTGRES_* settings for one service's schema."""
    parts: dict[str, Any] = conninfo_to_dict(database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(parts.get("dbname", "postgres")),
        "POSTGRES_HOST": str(parts.get("host", "127.0.0.1")),
        "POSTGRES_PORT": str(parts.get("port", "5432")),
        "POSTGRES_USER": str(parts.get("user", "postgres")),
        # eventsourcing insists on a password setting; empty works with trust auth.
        "POSTGRES_PASSWORD": str(parts.get("password", "")),
        "POSTGRES_SCHEMA": schema,
        "POSTGRES_POOL_SIZE": "4",
        "POSTGRES_MAX_OVERFLOW": "8",
        "POSTGRES_CONNECT_TIMEOUT": "5",
        # No ping before each use: it is a round trip per save or read (-18 % of mcp_proxy's
        # system calls per tool call). A connection PostgreSQL dropped fails its statement;
        # eventsourcing retries (10 x 0.2 s) on a fresh one and the pool discards the broken
        # one (tests/integration/test_outage_recovery.py restarts PostgreSQL under load).
        "POSTGRES_PRE_PING": "n",
        "CREATE_TABLE": "y",
    }


A = TypeVar("A")


def open_store(settings: Settings, schema: str, make: Callable[[dict[str, str]], A]) -> A:
    """`make(env)`: the service's eventsourcing application in `schema`, which it creates
    with its tables when missing. Instances starting together take turns (a PostgreSQL
    advisory lock per schema): eventsourcing runs `CREATE OR REPLACE FUNCTION` on every
    start, and two at once fail one of them with "tuple concurrently updated"."""
    url = settings.require_database()
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn, schema_setup(conn, schema):
        conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(schema)))
        return make(postgres_env(url, schema))


@contextmanager
def schema_setup(conn: psycopg.Connection[Any], schema: str) -> Iterator[None]:
    """Holds `schema`'s start-up lock on `conn` while the block creates tables in it (a
    session lock, released at the end even when `conn` goes back to a pool)."""
    key = [f"gatehouse store setup {schema}"]
    conn.execute("SELECT pg_advisory_lock(hashtext(%s))", key)
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", key)


def database_alive(database_url: str) -> bool:
    try:
        with psycopg.connect(database_url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


T = TypeVar("T")


def retrying(decide_and_save: Callable[[], T], attempts: int = 5) -> T:
    """Load-decide-save again when another writer saved the same aggregate first
    (optimistic concurrency: eventsourcing raises IntegrityError on a version clash)."""
    for _ in range(attempts - 1):
        try:
            return decide_and_save()
        except IntegrityError:
            continue
    return decide_and_save()


def insert_stored_events(schema: str, table: str) -> Composed:
    """One INSERT of a batch of stored events, its columns as the four `array_literals`;
    returns each row's notification id, originator id and version (`notifications`)."""
    return SQL(
        "INSERT INTO {}.{} (originator_id, originator_version, topic, state) "
        "SELECT * FROM unnest(%s::text::uuid[], %s::text::bigint[], %s::text::text[], %s::text::bytea[]) "
        "RETURNING notification_id, originator_id, originator_version"
    ).format(Identifier(schema), Identifier(table))


def notifications(
    stored: Sequence[StoredEvent], rows: Sequence[Sequence[Any]], events: Sequence[Any]
) -> list[tuple[Notification, Any]]:
    """The committed rows of an `insert_stored_events` as notifications with their domain
    events (`events[i]` is the one `stored[i]` encodes), in notification order."""
    ids = {(str(row[1]), int(row[2])): int(row[0]) for row in rows}
    fed = [
        (
            Notification(
                id=ids[(str(s.originator_id), s.originator_version)],
                originator_id=s.originator_id,
                originator_version=s.originator_version,
                topic=s.topic,
                state=s.state,
            ),
            e,
        )
        for s, e in zip(stored, events, strict=True)
    ]
    fed.sort(key=lambda row: row[0].id)
    return fed


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def array_literals(stored: list[StoredEvent]) -> list[str]:
    """The four columns as PostgreSQL array literals (text), cast to their types in the statement.

    psycopg adapts a Python list element by element in Python; for a batch of a few dozen
    rows that was a third of the write's CPU. Joined strings cost about half as much.
    """
    return [
        "{" + ",".join(str(s.originator_id) for s in stored) + "}",
        "{" + ",".join(str(s.originator_version) for s in stored) + "}",
        "{" + ",".join(_quoted(s.topic) for s in stored) + "}",
        "{" + ",".join('"\\\\x' + s.state.hex() + '"' for s in stored) + "}",
    ]
