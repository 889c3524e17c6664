"""Instances of one service starting together on real PostgreSQL: each opens its event store.

eventsourcing creates the store's tables and runs `CREATE OR REPLACE FUNCTION` every time an
application is constructed; two constructions at once made PostgreSQL fail one of them with
"tuple concurrently updated" (seen once in CI as a failing identity start).
`services.kit.eventstore.open_store` makes them take turns."""

from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import msgspec
import pytest

from services.identity.application import Identity
from services.kit.config import Settings
from services.kit.eventstore import open_store
from tests.helpers import OPERATOR

pytestmark = pytest.mark.integration

INSTANCES = 4


@pytest.mark.parametrize("schema", [f"setup_race_{n}" for n in range(3)])
def test_instances_starting_together_all_open_their_store(settings: Settings, schema: str) -> None:
    pepper = settings.require_pepper()
    barrier = Barrier(INSTANCES)

    def start(n: int) -> Identity:
        barrier.wait()  # all at once, as replicas started by one deploy
        return open_store(settings, schema, lambda env: Identity(pepper=pepper, env=env))

    with ThreadPoolExecutor(INSTANCES) as pool:
        apps = list(pool.map(start, range(INSTANCES)))
    try:
        assert len(apps) == INSTANCES
        # Every instance sees one store: what one records, another reads.
        meta = msgspec.to_builtins(OPERATOR)
        user, _, _ = apps[0].create_user("race@example.com", None, "free", False, "first", meta)
        assert apps[-1].user(str(user.id)).email == "race@example.com"
    finally:
        for app in apps:
            app.close()
