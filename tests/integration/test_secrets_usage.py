"""`secrets.usage`: reveal batches recorded late never resurrect a revoked secret's last use."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from services.secrets.adapters.usage import MemoryUsage, PostgresUsage

pytestmark = pytest.mark.integration

SID = "6f1c1d8e-2c4b-4b7a-9a55-0d5f2f6a1b01"
T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


@pytest.fixture(params=["postgres", "memory"])
def usage(request: pytest.FixtureRequest, database_url: str) -> Iterator[PostgresUsage | MemoryUsage]:
    if request.param == "memory":
        yield MemoryUsage()
        return
    table = PostgresUsage(database_url)
    table.open()
    table.open()  # the DDL (with its migration of older tables) runs twice without harm
    yield table
    table.close()


def test_a_reveal_recorded_after_the_revocation_stays_out(usage: PostgresUsage | MemoryUsage) -> None:
    usage.touch({SID: T0})
    assert usage.last_used([SID]) == {SID: T0}
    usage.forget(SID, T0 + timedelta(seconds=2))
    assert usage.last_used([SID]) == {}
    # the batch holding a reveal made before the revocation lands after it (the recorder lags)
    usage.touch({SID: T0 + timedelta(seconds=1)})
    assert usage.last_used([SID]) == {}
    # the secret is set again under the same id and revealed: that use counts
    usage.touch({SID: T0 + timedelta(seconds=3)})
    assert usage.last_used([SID]) == {SID: T0 + timedelta(seconds=3)}
    usage.touch({SID: T0 + timedelta(seconds=1)})  # out of order: never moves back
    assert usage.last_used([SID]) == {SID: T0 + timedelta(seconds=3)}


def test_forgetting_a_never_used_secret_still_fences_late_reveals(usage: PostgresUsage | MemoryUsage) -> None:
    usage.forget(SID, T0)
    usage.forget(SID, T0 - timedelta(seconds=5))  # an older revocation never moves the fence back
    usage.touch({SID: T0 - timedelta(seconds=1)})
    assert usage.last_used([SID]) == {}
