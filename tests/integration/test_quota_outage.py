"""The quota service through a PostgreSQL outage, and a standby taking over from a killed decider."""

import asyncio
import base64
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.commands import quota as q
from contracts.commands.common import CommandMeta
from contracts.commands.identity import CreateUser, UserCreated
from services.identity.bootstrap import build as build_identity
from services.kit.config import load_settings
from services.kit.embedded import EmbeddedPostgres
from services.kit.rpc import CommandClient, CommandFailed
from tests.helpers import OPERATOR, eventually, running, spawn_service, stop_process, wait_ready

pytestmark = pytest.mark.integration


def op() -> CommandMeta:
    """A fresh meta per command (a client may stamp its deadline on the one it sends)."""
    return CommandMeta(actor=OPERATOR.actor, correlation_id="test")


class Postgres:
    """An EmbeddedPostgres that can be stopped and started again on the same data dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server: EmbeddedPostgres | None = None

    def start(self) -> str:
        self.server = EmbeddedPostgres(self.root).start()
        return self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[Postgres]:
    pg = Postgres(tmp_path / "pg" / "data")
    pg.start()
    yield pg
    pg.stop()


async def reserve(client: CommandClient, user: UserCreated, key: str) -> q.Reservation:
    ask = q.Reserve(meta=op(), user_id=user.user_id, org_id=user.org_id, kind="call", key=key)
    return await client.call("quota", "reserve", ask, q.Reservation, timeout=3)


async def test_a_postgres_outage_answers_503_then_recovers_without_a_restart(
    nats_url: str, postgres: Postgres, tmp_path: Path
) -> None:
    assert postgres.server is not None
    env = {
        "GATEHOUSE_NATS_URL": nats_url,
        "GATEHOUSE_DATABASE_URL": postgres.server.url,
        "GATEHOUSE_KEY_PEPPER": base64.b64encode(os.urandom(32)).decode(),
        "GATEHOUSE_DATA_DIR": str(tmp_path / "data"),
    }
    quota = spawn_service("quota", env, tmp_path / "quota.log")
    try:
        async with running(build_identity, load_settings(env), "identity") as bus:
            client = CommandClient(bus)
            await wait_ready(bus, "quota")
            user = await client.call(
                "identity", "create_user", CreateUser(meta=op(), email="o@example.test"), UserCreated
            )
            assert (await reserve(client, user, "before")).granted
            postgres.stop()
            started = time.monotonic()
            with pytest.raises(CommandFailed) as down:
                await reserve(client, user, "during")
            assert down.value.problem.status == 503 and down.value.problem.detail
            assert time.monotonic() - started < 5
            postgres.start()

            async def serving() -> bool:
                try:
                    return (await reserve(client, user, "after")).granted
                except CommandFailed:
                    return False

            await eventually(serving, timeout=60, step=0.5)
            view = await client.call(
                "quota",
                "get",
                q.GetQuota(meta=op(), user_id=user.user_id, org_id=user.org_id),
                q.QuotaView,
            )
            assert view.calls_used == 2  # "before" and "after"; "during" was never granted
            report = await client.call(
                "quota", "verify", q.Verify(meta=op()), q.QuotaRebuildReport, timeout=60
            )
            assert report.differences == []
    finally:
        assert quota.poll() is None, (tmp_path / "quota.log").read_text()[-3000:]
        stop_process(quota)


async def test_a_standby_takes_over_when_the_decider_is_killed(
    service_env: dict[str, str], settings: object, tmp_path: Path
) -> None:
    first = spawn_service("quota", service_env, tmp_path / "quota-1.log")
    second = None
    try:
        async with running(build_identity, load_settings(service_env), "identity") as bus:
            client = CommandClient(bus)
            await wait_ready(bus, "quota")
            second = spawn_service("quota", service_env, tmp_path / "quota-2.log")
            await asyncio.sleep(2)  # the standby is up, waiting for the lease
            user = await client.call(
                "identity", "create_user", CreateUser(meta=op(), email="s@example.test"), UserCreated
            )
            assert (await reserve(client, user, "one")).granted
            first.send_signal(signal.SIGKILL)
            first.wait()

            async def taken_over() -> q.Reservation | None:
                try:
                    return await reserve(client, user, "two")
                except CommandFailed:
                    return None

            assert (await eventually(taken_over, timeout=30, step=0.3)).granted
            again = await reserve(client, user, "one")  # the standby loaded what the first recorded
            assert again.granted and again.used == 2
    finally:
        stop_process(first)
        if second is not None:
            stop_process(second)
